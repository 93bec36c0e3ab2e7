"""The registry: method name → its `AdapterLayer` class."""

from .base import AdapterLayer, AdapterSpec
from .dora import DoRALayer
from .edora import EDoRALayer
from .lora import LoRALayer
from .loraxs import LoRAXSLayer
from .lorasb import LoRASBLayer
from .milora import MiLoRALayer
from .pissa import PiSSALayer

METHODS: dict[str, type[AdapterLayer]] = {
    cls.name: cls
    for cls in (LoRALayer, DoRALayer, PiSSALayer, MiLoRALayer, LoRAXSLayer, EDoRALayer, LoRASBLayer)
}

__all__ = ["METHODS", "AdapterLayer", "AdapterSpec"]
