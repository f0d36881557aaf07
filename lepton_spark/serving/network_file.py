"""The trained network on disk without pickle: its weights in safetensors, its architecture in JSON.

A folder with two files:

* ``network.json``: the format, the model config (:class:`~lepton_spark.config.schema.ModelConfig`)
  and whether Linear layers were quantized (``compress.quantize``);
* ``network.safetensors``: the state dict. A dynamically quantized Linear keeps its int8 weights:
  its packed parameters are stored as the int8 values, the scale(s) and zero point(s), and the
  float bias;
* ``hf/`` (model ``hf`` only): the Hugging Face config and tokenizer, so the network is rebuilt
  and its text tokenised without the pretrained folder it was fine-tuned from.

Loading rebuilds the network from lepton-spark's code and the feature spec
(:func:`lepton_spark.models.build_model`), quantizes it the same way when it was, then loads the
weights: nothing is unpickled, so it works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.
A user's model factory (``model.name: package.module:function``) must be importable where the model
is loaded, as its class had to be when models were pickles.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lepton_spark.config.schema import ModelConfig
from lepton_spark.spec import FeatureSpec

FORMAT = "lepton-spark/network-v1"
WEIGHTS_FILE = "network.safetensors"
ARCHITECTURE_FILE = "network.json"

_PACKED = "._packed_params._packed_params"  # (int8 weight, bias) of a dynamic quantized Linear
_PACKED_DTYPE = "._packed_params.dtype"


def save(network: nn.Module, model: ModelConfig, folder: Path) -> None:
    """Write ``network`` (built from ``model``, maybe compressed) into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    architecture = {
        "format": FORMAT,
        "model": model.model_dump(mode="json"),
        "quantized": is_quantized(network),
        "packed_dtypes": _flatten(network.state_dict())[1],
    }
    (folder / WEIGHTS_FILE).write_bytes(weights_bytes(network))
    if model.name == "hf":  # its config and tokenizer: it loads where model.pretrained is not
        from lepton_spark import hf

        hf.save_parts(network, hf_parts(folder))
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(architecture, indent=2))


def hf_parts(folder: Path) -> Path:
    """A served ``hf`` network's config and tokenizer (:func:`lepton_spark.hf.save_parts`)."""
    from lepton_spark import hf

    return folder / hf.PARTS


def weights_bytes(network: nn.Module) -> bytes:
    """What :func:`save` writes as ``network.safetensors`` (compression measures its size)."""
    from safetensors.torch import save

    return save(_flatten(network.state_dict())[0], metadata={"format": FORMAT})


def load(folder: Path, spec: FeatureSpec) -> nn.Module:
    """The network :func:`save` wrote, in eval mode on the CPU."""
    from safetensors.torch import load_file

    from lepton_spark.models import build_model

    architecture = json.loads((folder / ARCHITECTURE_FILE).read_text())
    if architecture.get("format") != FORMAT:
        raise ValueError(
            f"{folder / ARCHITECTURE_FILE}: format {architecture.get('format')!r} is not {FORMAT!r}"
        )
    model = ModelConfig.model_validate(architecture["model"])
    if model.name == "hf":  # rebuilt from the config it carries; the weights come below
        model = model.model_copy(update={"pretrained": str(hf_parts(folder))})
    network = build_model(model, spec, pretrained=False).eval()
    if architecture["quantized"]:
        network = quantize(network)
    state = _unflatten(load_file(str(folder / WEIGHTS_FILE)), architecture["packed_dtypes"])
    # The modules' state-dict versions (quantized Linear reads its layout by them) are those of
    # the network just built: the same code built the saved one.
    state._metadata = network.state_dict()._metadata  # type: ignore[attr-defined]
    network.load_state_dict(state)
    return network.eval()


def quantize(network: nn.Module) -> nn.Module:
    """Dynamic int8 Linear layers (``compress.quantize``)."""
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao, which has no
        # release for this torch yet; its dynamic int8 Linear is still torch's own kernel.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(network, {nn.Linear}, dtype=torch.qint8)


def is_quantized(network: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in network.modules())


def _flatten(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors for safetensors (contiguous copies: tied weights are stored twice), and the
    packed parameters' dtypes by key."""
    tensors: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    for key, value in state.items():
        if key.endswith(_PACKED_DTYPE):
            dtypes[key] = str(value).removeprefix("torch.")
        elif key.endswith(_PACKED):
            weight, bias = value
            tensors.update(_quantized_parts(key, weight))
            if bias is not None:
                tensors[f"{key}.bias"] = bias.detach().contiguous().clone()
        elif isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous().clone()
        else:
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return tensors, dtypes


def _quantized_parts(key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = {f"{key}.int8": weight.int_repr().contiguous()}
    if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        parts[f"{key}.scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
        parts[f"{key}.zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
    else:
        parts[f"{key}.scales"] = weight.q_per_channel_scales().contiguous()
        parts[f"{key}.zero_points"] = weight.q_per_channel_zero_points().contiguous()
        parts[f"{key}.axis"] = torch.tensor([weight.q_per_channel_axis()], dtype=torch.int64)
    return parts


def _unflatten(tensors: dict[str, torch.Tensor], dtypes: dict[str, str]) -> OrderedDict[str, Any]:
    state: OrderedDict[str, Any] = OrderedDict()
    packed: set[str] = set()
    for key, value in tensors.items():
        head, _, _ = key.rpartition(".")
        if head.endswith(_PACKED):
            packed.add(head)
        else:
            state[key] = value
    for key in packed:
        state[key] = (_quantized_weight(tensors, key), tensors.get(f"{key}.bias"))
    for key, name in dtypes.items():
        state[key] = getattr(torch, name)
    return state


def _quantized_weight(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    values = tensors[f"{key}.int8"]
    if f"{key}.scale" in tensors:
        return torch._make_per_tensor_quantized_tensor(
            values, float(tensors[f"{key}.scale"][0]), int(tensors[f"{key}.zero_point"][0])
        )
    axis = int(tensors[f"{key}.axis"][0])
    return torch._make_per_channel_quantized_tensor(
        values, tensors[f"{key}.scales"], tensors[f"{key}.zero_points"], axis
    )
