"""`multiconcept ui`: learn, generate and compose concepts in the browser (gradio).

An interface, like the command line: every action calls `multiconcept.api`.
One tab per module (learn_tab, generate_tab, compose_tab); gradio is imported
only by those and by `app.build`, so importing this package's plain helpers
(masks, jobs, launch's checks) stays cheap.
"""
