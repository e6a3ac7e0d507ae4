"""The demo zoo: a tiny Llama base model and experts trained on synthetic skills, built offline on a CPU."""

from auto_merge.zoo.locate import zoo_model_path, zoo_root
from auto_merge.zoo.paths import ZOO_MODEL_NAMES

__all__ = ["ZOO_MODEL_NAMES", "zoo_root", "zoo_model_path"]
