"""Task configs selectable with ``--conf models <name>``."""
