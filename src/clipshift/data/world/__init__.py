"""The built-in emoji world: a small DomainNet of open-licensed emoji art (see DESIGN.md).

``build_world`` renders the reference task (train/val/test), one shift test set per style, two
pretraining pools that differ only in style mix, and a retrieval set, plus a dataset card.
"""

from clipshift.data.world.build import build_world, select_classes
from clipshift.data.world.seeding import derive_seed, styles_in_use

__all__ = ["build_world", "derive_seed", "select_classes", "styles_in_use"]
