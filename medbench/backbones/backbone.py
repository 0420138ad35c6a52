"""What medbench knows about a backbone before building it (the registry's entries)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported only when a network is built
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)



@dataclass(frozen=True)
class Backbone:
    """What medbench knows about a backbone before building it."""

    name: str
    #: ``build(num_classes=..., in_chans=...) -> nn.Module`` with random weights
    build: Callable[..., "nn.Module"]
    family: str = "third-party"
    #: the pre-training data, e.g. "ImageNet-21k"; "none" when there are no pre-trained weights
    pretraining: str = "none"
    #: parameters without the classification head, for 3 input channels
    params: int | None = None
    default_resolution: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: where the name is defined: "medbench", "timm", "entry point <distribution>"
    source: str = "medbench"
    #: where pre-trained weights come from, for people
    weights: str = "none"
    #: hub repository of the weights (Hugging Face), if any
    hub_id: str | None = None
    #: the weights file names looked for in that repository, in order
    hub_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    #: loads pre-trained weights from a local file into a built network; None: no pre-trained weights
    load_weights: Callable[["nn.Module", Path], None] | None = None
    #: how to get the weights file when the hub cannot serve it
    weights_help: str = ""
    description: str = ""
    #: names of the stages transfusion counts, in order (dotted module paths)
    blocks: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_init(self) -> str:
        return "pretrained" if self.load_weights is not None and self.pretraining != "none" else "random"
