"""One recipe per algorithm. ``registry.py`` holds the table that maps the Hydra ``algorithm``
option to a recipe; ``<name>.py`` holds the algorithm's documented config block and how it builds
its data and LightningModule; the runner (``nemo_rlhf/runner.py``) owns the run directory, resume,
fit, summary and export for all of them. Adding an algorithm = one recipe file, one row in
``registry.RECIPES`` and its ``conf/<name>_tiny.yaml``."""
