"""ToyWorld: the embedded synthetic world (docs/toyworld.md): creatures of three kinds whose identity is a
combination of five parts.

`render` draws them with exact ground truth, `scenes` says which scenes the base, the world pool and the
methods' data are made of (and the personal concepts), `check` reads every part back from pixels, `score`
turns readings into identity, swaps and leaks, `files` writes the folders the methods read;
`workflows/toyworld_build` trains and ships the base pipeline and the two CLIPs.
"""

from .check import Analysis, Reading, analyse
from .files import left_to_right, save_png, write_concept_folder, write_reference, write_two_concept_folder
from .render import (
    BACKGROUNDS,
    BODY_COLOURS,
    HATS,
    HEAD_COLOURS,
    IMAGE_SIZE,
    KINDS,
    MARKING_COLOURS,
    MARKINGS,
    NAMED_PARTS,
    PART_VALUES,
    PARTS,
    UNNAMED_PARTS,
    Creature,
    Placed,
    Scene,
    Spec,
    article,
    render,
)
from .scenes import (
    EVIDENCE_CONCEPTS,
    PERSONAL_CONCEPTS,
    PILOT_CONCEPTS,
    PersonalConcept,
    base_training_scene,
    caption,
    caption_in_order,
    concept,
    concept_reference_set,
    differ_in_every_part,
    free_specs,
    full_caption,
    layout_specs,
    random_creature,
    subject_dataset,
    subject_scene,
    two_concept_scene,
    two_kind_pairs,
    world_scene,
)
from .score import (
    ABSENT,
    TRAITS,
    identity,
    leakage,
    match,
    pair_outcomes,
    part_distribution,
    part_outcomes,
    read_shares,
    total_variation,
)

__all__ = [
    "ABSENT", "Analysis", "BACKGROUNDS", "BODY_COLOURS", "Creature", "EVIDENCE_CONCEPTS", "HATS", "HEAD_COLOURS", "IMAGE_SIZE",
    "KINDS", "MARKINGS", "MARKING_COLOURS", "NAMED_PARTS", "PARTS", "PART_VALUES", "PERSONAL_CONCEPTS",
    "PILOT_CONCEPTS", "PersonalConcept", "Placed", "Reading", "Scene", "Spec", "TRAITS", "UNNAMED_PARTS", "analyse",
    "article", "base_training_scene", "caption", "caption_in_order", "concept", "concept_reference_set",
    "differ_in_every_part", "free_specs", "full_caption", "identity", "layout_specs", "leakage", "left_to_right",
    "match", "pair_outcomes", "part_distribution", "part_outcomes", "random_creature", "read_shares", "render",
    "save_png", "subject_dataset", "subject_scene", "total_variation", "two_concept_scene", "two_kind_pairs", "world_scene",
    "write_concept_folder", "write_reference", "write_two_concept_folder",
]
