"""Command-line experiments run by hand (``python -m lib.experiments.<name>``), outside the MONAI Label glue:
``demo_finetune`` (the train task on a sample structure, before/after Dice) and ``uncertainty_vs_error`` (does the
``uncertainty`` score predict the real error). Figures: docs/APP_FIGURES.md."""
