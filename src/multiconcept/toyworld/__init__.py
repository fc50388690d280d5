"""ToyWorld: the embedded synthetic world (docs/toyworld.md).

`render` draws scenes with exact ground truth, `scenes` samples them, `check` scores images from
pixels alone; `workflows/toyworld_build` trains and ships the base pipeline
and the evaluator.
"""

from .check import Analysis, Detection, analyse, check, checker_accuracy
from .render import (
    BACKGROUNDS,
    CLASS_NOUNS,
    COLOURS,
    IMAGE_SIZE,
    PERSONAL_CONCEPTS,
    Appearance,
    ObjectSpec,
    PersonalConcept,
    Scene,
    SceneObject,
    describe,
    is_personal,
    render_scene,
)
from .scenes import (
    Subject,
    SubjectRecord,
    base_training_scene,
    concept_reference_set,
    left_to_right,
    subject_dataset,
    two_concept_scene,
    world_scene,
    write_concept_folder,
    write_two_concept_folder,
)

__all__ = [
    "Analysis", "Appearance", "BACKGROUNDS", "CLASS_NOUNS", "COLOURS", "Detection", "IMAGE_SIZE",
    "ObjectSpec", "PERSONAL_CONCEPTS", "PersonalConcept", "Scene", "SceneObject", "Subject",
    "SubjectRecord", "analyse", "base_training_scene", "check", "checker_accuracy",
    "concept_reference_set", "describe", "is_personal", "left_to_right", "render_scene", "subject_dataset",
    "two_concept_scene", "world_scene", "write_concept_folder", "write_two_concept_folder",
]
