"""Files a user hands selectune are never trusted: a damaged or hostile task delta, checkpoint,
results.json / metrics.jsonl or data file gives one line naming the file and the problem (or, for
`report`, a one-line warning and the rest of the report), never a traceback and never a silently
wrong model.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError

from conftest import compose_run

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(glue_root, tmp_path_factory) -> dict[str, Path]:
    """Two finished tiny runs (a sparse SaRA delta and a LoRA delta) and a compact copy of the first."""
    from selectune.commands import train

    root = tmp_path_factory.mktemp("runs")
    data = f"task.data_root={glue_root}"
    out = {}
    for method in ("sara", "lora"):
        train(compose_run(f"glue/rte_{method}", data, "trainer.max_steps=2", "task.max_train_examples=32",
                          "task.max_eval_examples=16"), root / method)
        out[method] = root / method / "delta.safetensors"
    compact = root / "compact.safetensors"
    TaskDelta.load(out["sara"]).save(compact, compact="float16")
    out["compact"] = compact
    return out


@pytest.fixture(scope="module")
def base(runs):
    """The base model the runs were trained on (a fresh copy of its weights per case)."""
    from omegaconf import OmegaConf

    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    spec = RunSpec.from_config(OmegaConf.create(TaskDelta.load(runs["sara"]).meta["config"]))
    backbone, _ = build(spec, load_task(spec.task))
    weights = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    return backbone.model, weights


def read_raw(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(safetensors header, tensors, metadata) of a file, read without selectune's checks."""
    from safetensors import safe_open

    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + size])
    with safe_open(str(path), framework="pt") as handle:
        return header, {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def one_line_refusal(path: Path, *patterns: str) -> str:
    with pytest.raises(SelectuneError) as info:
        TaskDelta.load(path)
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


# ------------------------------------------------------------------------------- every tensor checked
SPARSE = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize(("change", "problem"), [
    (lambda t: t[f"{SPARSE}::indices"].__setitem__(0, -3), "negative index (-3)"),
    (lambda t: t[f"{SPARSE}::indices"].__setitem__(1, t[f"{SPARSE}::indices"][0]), "are duplicated"),
    (lambda t: t[f"{SPARSE}::indices"].__setitem__(slice(0, 2), t[f"{SPARSE}::indices"][:2].flip(0)), "not sorted"),
    (lambda t: t[f"{SPARSE}::values"].__setitem__(5, float("nan")), "1 NaN or infinite values"),
    (lambda t: t[f"{SPARSE}::values"].__setitem__(5, float("-inf")), "1 NaN or infinite values"),
    (lambda t: t.update({f"{SPARSE}::values": t[f"{SPARSE}::values"][:-1]}), "does not match '::values'"),
    (lambda t: t.update({f"{SPARSE}::values": t[f"{SPARSE}::values"].to(torch.int32)}), "not a floating-point"),
    (lambda t: t.update({f"{SPARSE}::indices": t[f"{SPARSE}::indices"].float()}), "has dtype torch.float32"),
    (lambda t: t.update({f"{SPARSE}::indices": t[f"{SPARSE}::indices"].view(1, -1)}), "expected 1"),
    (lambda t: t.pop(f"{SPARSE}::values"), "comes without '::values'"),
    (lambda t: t.update({"classifier.weight::set": t["classifier.weight::set"].long()}), "not a floating-point"),
    (lambda t: t.update({f"{SPARSE}::weird": torch.zeros(1)}), "unknown entry"),
])
def test_a_bad_tensor_is_refused_naming_it(runs, tmp_path, change, problem):
    _, tensors, metadata = read_raw(runs["sara"])
    change(tensors)
    one_line_refusal(write_raw(tmp_path / "d.safetensors", tensors, metadata), "is damaged", problem)


def test_an_index_of_a_billion_is_refused_before_any_weight_changes(runs, base, tmp_path):
    model, weights = base
    _, tensors, metadata = read_raw(runs["sara"])
    tensors[f"{SPARSE}::indices"][-1] = 10**9
    delta = TaskDelta.load(write_raw(tmp_path / "d.safetensors", tensors, metadata))  # fits int32: a valid file
    model.load_state_dict(weights)
    with pytest.raises(SelectuneError, match=rf"'{SPARSE}::indices' holds index 1000000000, but the model's "
                                             rf"tensor has \d+ entries"):
        delta.merge_into(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # nothing half-applied
    tensors[f"{SPARSE}::indices"] = tensors[f"{SPARSE}::indices"].long()
    tensors[f"{SPARSE}::indices"][-1] = 2**40  # beyond int32: would wrap around when cast
    one_line_refusal(write_raw(tmp_path / "e.safetensors", tensors, metadata), f"'{SPARSE}::indices' holds",
                     "beyond int32")


def test_lora_factors_that_do_not_match(runs, base, tmp_path):
    _, tensors, metadata = read_raw(runs["lora"])
    a_key = next(k for k in tensors if k.endswith("::lora_A"))
    good = dict(tensors)
    tensors[a_key] = tensors[a_key][:-1]  # rank r-1 against B's r
    one_line_refusal(write_raw(tmp_path / "d.safetensors", tensors, metadata), "::lora_B'", "does not match")
    good[a_key] = torch.cat([good[a_key], good[a_key][:, :1]], 1)  # one input column too many for the base
    delta = TaskDelta.load(write_raw(tmp_path / "e.safetensors", good, metadata))
    with pytest.raises(SelectuneError, match=r"\(lora_B @ lora_A\) has shape .* another base model"):
        delta.merge_into(base[0])


@pytest.mark.parametrize(("meta", "problem"), [
    ("[1, 2]", "metadata is a JSON list, not an object"),
    ('"text"', "metadata is a JSON str, not an object"),
    ('{"base_hash": "x", "method": "lora"}', "metadata 'config' is missing"),
    ('{"config": {}, "method": "lora"}', "metadata 'base_hash' is missing"),
    ('{"config": [], "base_hash": "x", "method": "lora"}', "metadata 'config' is a list"),
])
def test_metadata_that_is_not_a_delta_s(runs, tmp_path, meta, problem):
    _, tensors, metadata = read_raw(runs["sara"])
    path = write_raw(tmp_path / "d.safetensors", tensors, {**metadata, "selectune": meta})
    one_line_refusal(path, f"delta {path} is damaged", problem)


def test_compact_gaps_that_add_up_out_of_range(runs, tmp_path):
    _, tensors, metadata = read_raw(runs["compact"])
    key = f"{SPARSE}::index_gaps"
    gaps = tensors[key].to(torch.int32)
    gaps[1] = -gaps[0] - 1  # the second index becomes -1
    tensors[key] = gaps
    one_line_refusal(write_raw(tmp_path / "d.safetensors", tensors, metadata), "negative index (-1)")


# ---------------------------------------------------------------------------------------------- fuzz
def split_file(data: bytes) -> tuple[dict, int]:
    """The safetensors header (JSON) and where the tensor data starts."""
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), 8 + size


def with_header(header: dict, data: bytes) -> bytes:
    """The file `data` with its header replaced (tensor data unchanged)."""
    start = split_file(data)[1]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[start:]


def byte_corruption(rng: random.Random, data: bytes) -> tuple[str, bytes, set[str]]:
    """(what, corrupted bytes, keys whose tensors must stay bit-identical if the file is accepted)."""
    header, start = split_file(data)
    keys = {k for k in header if k != "__metadata__"}
    kind = rng.choice(["truncate", "flip data", "flip header", "retype", "reshape", "swap data"])
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))], keys
    if kind == "flip data":
        at = rng.randrange(start, len(data))
        hit = next(k for k in keys if start + header[k]["data_offsets"][0] <= at < start + header[k]["data_offsets"][1])
        flipped = bytearray(data)
        flipped[at] ^= 1 << rng.randrange(8)
        return f"{kind} in {hit}", bytes(flipped), keys - {hit}
    if kind == "flip header":
        flipped = bytearray(data)
        flipped[rng.randrange(8, start)] ^= 1 << rng.randrange(8)
        return kind, bytes(flipped), keys
    key = rng.choice(sorted(keys))
    entry = header[key]
    if kind == "retype":  # same item size, other meaning
        swap = {"F32": "I32", "I32": "F32", "F16": "I16", "U16": "F16", "I64": "F64"}
        entry["dtype"] = swap.get(entry["dtype"], "U8")
        return f"{kind} {key}", with_header(header, data), keys - {key}
    if kind == "reshape":  # same number of entries, other shape
        entry["shape"] = [1, *entry["shape"]] if len(entry["shape"]) < 2 else entry["shape"][::-1]
        return f"{kind} {key}", with_header(header, data), keys - {key}
    other = rng.choice(sorted(k for k in keys if header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
                              == entry["data_offsets"][1] - entry["data_offsets"][0]))
    entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    return f"{kind} {key} <-> {other}", with_header(header, data), keys - {key, other}


def semantic_corruption(rng: random.Random, tensors: dict[str, torch.Tensor],
                        numel: dict[str, int]) -> str:
    """Change `tensors` in a way every check must refuse; returns what was done."""
    sparse = sorted(k.rpartition("::")[0] for k in tensors if k.endswith(("::indices", "::index_gaps")))
    lora = sorted(k.rpartition("::")[0] for k in tensors if k.endswith("::lora_A"))
    name = rng.choice(sparse or lora)
    if lora and not sparse:
        key = f"{name}::{rng.choice(['lora_A', 'lora_B'])}"
        kind = rng.choice(["nan", "inf", "int", "rank", "drop row", "scale vector"])
    else:
        key = f"{name}::values"
        kind = rng.choice(["nan", "inf", "int", "negative", "out of range", "billion", "duplicate", "unsorted",
                           "short values", "float indices", "drop values"])
    t = tensors[key]
    index_key = f"{name}::indices"
    if kind in ("negative", "out of range", "billion", "duplicate", "unsorted", "float indices"):
        if index_key not in tensors:  # the compact form: work on real indices
            tensors[index_key] = torch.cumsum(tensors.pop(f"{name}::index_gaps").long(), 0).int()
        idx = tensors[index_key]
        at = rng.randrange(1, idx.numel())
        if kind == "negative":
            idx[at] = -rng.randrange(1, 2**31)
        elif kind == "out of range":
            idx[-1] = numel[name] + rng.randrange(4)
        elif kind == "billion":
            idx[at] = 10**9
        elif kind == "duplicate":
            idx[at] = idx[at - 1]
        elif kind == "unsorted":
            idx[at - 1], idx[at] = int(idx[at]), int(idx[at - 1])
        else:
            tensors[index_key] = idx.float()
    elif kind in ("nan", "inf"):
        t.view(-1)[rng.randrange(t.numel())] = float("nan") if kind == "nan" else rng.choice([1, -1]) * float("inf")
    elif kind == "int":
        tensors[key] = t.to(rng.choice([torch.int32, torch.int16, torch.uint8, torch.bool]))
    elif kind == "rank":
        tensors[key] = t.reshape(1, *t.shape)
    elif kind == "drop row":
        tensors[key] = t[:-1]
    elif kind == "scale vector":
        tensors[f"{name}::lora_scale"] = torch.tensor([2.0, 2.0])
    elif kind == "short values":
        tensors[key] = t[:-rng.randrange(1, t.numel())]
    elif kind == "drop values":
        del tensors[key]
    return f"{kind} {key}"


def reference_merge(delta: TaskDelta, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What applying `delta` must give, computed on its own (plain Python checks of every index)."""
    out = {k: v.clone() for k, v in weights.items()}
    for name, parts in delta.by_parameter().items():
        w = out[name]
        if "set" in parts:
            w.copy_(parts["set"])
        if "indices" in parts:
            idx = parts["indices"].tolist()
            assert idx == sorted(set(idx)) and (not idx or idx[0] >= 0 and idx[-1] < w.numel())
            assert torch.isfinite(parts["values"]).all()
            flat = w.view(-1)
            flat[idx] = flat[idx].float() + parts["values"].float()
        if "lora_A" in parts:
            w.copy_(w.float() + (parts["lora_B"].float() @ parts["lora_A"].float()) * parts["lora_scale"].float())
    return out


def test_fuzzed_deltas_are_applied_exactly_or_refused_in_one_line(runs, base, tmp_path):
    """Random corruptions of real stored deltas (plain, compact, LoRA): each one is either refused with
    one line (loading or applying, and then the model is untouched) or applied exactly as its file
    says, with every tensor the corruption did not reach bit-identical to the original."""
    model, weights = base
    numel = {k: v.numel() for k, v in weights.items()}
    originals = {name: TaskDelta.load(path) for name, path in runs.items()}
    rng = random.Random(20240)
    counts: dict[str, int] = {"cases": 0, "refused": 0, "applied": 0}
    applied = []
    for case in range(150):
        source = rng.choice(sorted(runs))
        path = tmp_path / f"case{case}.safetensors"
        semantic = case % 2 == 1
        if semantic:
            _, tensors, metadata = read_raw(runs[source])
            what = semantic_corruption(rng, tensors, numel)
            write_raw(path, tensors, metadata)
            untouched: set[str] = set()
        else:
            what, data, untouched = byte_corruption(rng, runs[source].read_bytes())
            path.write_bytes(data)
        model.load_state_dict(weights)
        counts["cases"] += 1
        try:
            delta = TaskDelta.load(path)
        except SelectuneError as err:  # refused on loading: the message names the file
            assert "\n" not in str(err) and str(path) in str(err), (what, str(err))
            counts["refused"] += 1
            continue
        try:
            delta.merge_into(model)
        except SelectuneError as err:  # refused against the model: the message names the tensor
            assert "\n" not in str(err) and str(err).startswith("task delta: '"), (what, str(err))
            assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), what
            counts["refused"] += 1
            continue
        assert not semantic, f"case {case} ({what}) was applied"
        expected = reference_merge(delta, weights)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), what
        plain = {k.replace("::index_gaps", "::indices") for k in untouched}
        for key in plain & set(originals[source].tensors):
            assert torch.equal(delta.tensors[key], originals[source].tensors[key]), (what, key)
        counts["applied"] += 1
        applied.append(" ".join(what.split()[:2]))
    print(f"fuzzed deltas: {counts}; applied: {sorted(applied)}")
    assert counts["refused"] >= 75 and counts["cases"] == 150


def cli_failure(result, *patterns: str) -> str:
    """Exit 2, one error line on stderr (the last: progress lines may come before it) naming the
    problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("selectune: error: "), result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_refuse_a_damaged_delta(runs, glue_root, tmp_path, command):
    from conftest import run_cli

    _, tensors, metadata = read_raw(runs["sara"])
    tensors[f"{SPARSE}::indices"][3] = -1  # would wrap around to the tensor's last entry
    run = tmp_path / "run"
    run.mkdir()
    write_raw(run / "delta.safetensors", tensors, metadata)
    before = sorted(p.name for p in run.iterdir())
    args = [f"run={run}"] + ([f"out={tmp_path / 'out'}"] if command == "export" else [])
    result = run_cli(command, *args, cwd=tmp_path, env={"SELECTUNE_DATA": str(glue_root)})
    cli_failure(result, f"delta {run / 'delta.safetensors'} is damaged", f"'{SPARSE}::indices'", "negative index")
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- checkpoints
CKPT_RUN = ("glue/rte_lora", "trainer.max_steps=4", "trainer.checkpoint_every=2", "task.max_train_examples=32",
            "task.max_eval_examples=16")


@pytest.fixture(scope="module")
def unfinished(glue_root, tmp_path_factory) -> Path:
    """A run folder as a run killed after its step-2 checkpoint leaves it (results.json never written)."""
    from selectune import checkpoint
    from selectune.commands import train

    run = tmp_path_factory.mktemp("ckpt") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "remove", lambda run_dir: None)  # keep the last checkpoint
        train(compose_run(*CKPT_RUN, f"task.data_root={glue_root}"), run)
    (run / "results.json").unlink()
    assert (run / "checkpoint" / "state.pt").is_file()
    return run


def garble(data: bytes) -> bytes:
    rng = random.Random(7)
    return data[:64] + bytes(rng.randrange(256) for _ in range(len(data) - 128)) + data[-64:]


def saved_list(path: Path) -> None:
    torch.save([1, 2, 3], path)


def state_without_rng(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["rng"], state["optimizer"]
    torch.save(state, path)


def state_with_a_list_as_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["optimizer"] = [state["optimizer"]]
    torch.save(state, path)


def optimizer_moment_of_another_shape(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = moments["exp_avg"].reshape(-1)[:-1].clone()
    torch.save(state, path)


def optimizer_group_missing_a_tensor(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"][0]["params"].pop()
    torch.save(state, path)


def trainable_with_nan(path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, str(path))


@pytest.mark.parametrize(("file", "damage", "problem"), [
    ("state.pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "state.pt cannot be read"),
    ("state.pt", lambda p: p.write_bytes(garble(p.read_bytes())), "state.pt cannot be read"),
    ("state.pt", lambda p: p.write_bytes(b""), "state.pt cannot be read"),
    ("state.pt", saved_list, "state.pt holds a list, not the loop state"),
    ("state.pt", state_without_rng, "state.pt lacks optimizer, rng"),
    ("state.pt", state_with_a_list_as_optimizer, "state.pt has a list as 'optimizer'"),
    ("state.pt", optimizer_moment_of_another_shape, "state.pt's optimizer exp_avg has shape"),
    ("state.pt", optimizer_group_missing_a_tensor, "state.pt's optimizer state does not fit this run"),
    ("trainable.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-10]), "trainable.safetensors cannot be read"),
    ("trainable.safetensors", lambda p: p.write_bytes(garble(p.read_bytes())), "trainable.safetensors cannot be read"),
    ("trainable.safetensors", trainable_with_nan, "holds NaN or infinite values"),
])
def test_a_damaged_checkpoint_is_refused_on_resume(unfinished, glue_root, tmp_path, file, damage, problem):
    import shutil

    from selectune.commands import train

    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    damage(run / "checkpoint" / file)
    kept = {p: p.read_bytes() for p in [*(run / "checkpoint").iterdir(), run / "metrics.jsonl"]}
    with pytest.raises(SelectuneError) as info:
        train(compose_run(*CKPT_RUN, f"task.data_root={glue_root}", "trainer.resume=true"), run)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint at {run / 'checkpoint'} is damaged: "), message
    assert problem in message, message
    assert all(p.read_bytes() == data for p, data in kept.items())  # nothing of the run changed
    assert not (run / "results.json").exists()


def test_the_cli_reports_a_damaged_checkpoint_in_one_line(unfinished, glue_root, tmp_path):
    import shutil

    from conftest import TINY, run_cli

    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    state = run / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    overrides = [f"recipe={CKPT_RUN[0]}", *TINY, *CKPT_RUN[1:], f"task.data_root={glue_root}"]
    result = run_cli("train", *overrides, "trainer.resume=true", f"out_dir={run}", cwd=tmp_path)
    cli_failure(result, f"checkpoint at {run / 'checkpoint'} is damaged: state.pt cannot be read")


# ---------------------------------------------------------------------------------------------- report
def test_report_skips_unreadable_runs_and_lines_with_a_warning_each(tmp_path, capsys):
    from test_report import fake_run

    from selectune.cli import main

    runs = tmp_path / "runs"
    fake_run(runs / "good1", "mrpc", "lora", 1, {"f1": 80.0, "accuracy": 70.0}, 5000)
    fake_run(runs / "good2", "mrpc", "lora", 2, {"f1": 84.0, "accuracy": 74.0}, 5000)
    with (runs / "good2" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 0.2\n[1, 2]\n\xff\xfe\n')  # a line cut short, a list, bad bytes
    bad = {"corrupt": "{not json", "empty": "", "no_metrics": {"metrics": ...}, "list": [1, 2],
           "metrics_list": {"metrics": []}, "no_primary": {"metrics": {"dev": {"accuracy": 70.0}}},
           "text_metric": {"metrics": {"dev": {"f1": "high", "accuracy": 70.0}}}, "bad_config": {}}
    for name, content in bad.items():
        fake_run(runs / name, "mrpc", "sara", 3, {"f1": 99.0, "accuracy": 99.0}, 5000)
        results = runs / name / "results.json"
        if isinstance(content, dict):  # ... drops the key
            merged = {**json.loads(results.read_text()), **content}
            content = json.dumps({k: v for k, v in merged.items() if v is not ...})
        elif not isinstance(content, str):
            content = json.dumps(content)
        results.write_text(content)
    (runs / "bad_config" / "config.yaml").write_text("a: [unclosed\n  b: :\n")
    main(["report", str(runs), f"out={tmp_path / 'rep'}"])
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("selectune: warning: skipping ")]
    assert len(warnings) == len(bad) + 3 and len(err) == len(warnings), err
    for name in bad:
        assert any(f"{runs / name / 'results.json'}: " in line for line in warnings), name
    for number in (4, 5, 6):
        assert any(f"{runs / 'good2' / 'metrics.jsonl'}:{number}: " in line for line in warnings), number
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "2 runs from" in text and "f1 82.00 ± 2.83" in text and "| sara |" not in text


def test_report_with_no_readable_run_fails_in_one_line(tmp_path):
    from conftest import run_cli

    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "results.json").write_text("")
    result = run_cli("report", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"selectune: warning: skipping {tmp_path / 'runs' / 'a' / 'results.json'}: not readable JSON "
        "(JSONDecodeError: Expecting value: line 1 column 1 (char 0))",
        f"selectune: error: report: no results.json below {tmp_path / 'runs'} that can be read"]
    assert not (tmp_path / "runs" / "report.md").exists()


# ------------------------------------------------------------------------------------------ data files
RTE_HEADER = b"index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize(("content", "where"), [
    (RTE_HEADER + b"0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n",
     "train.tsv:3: not UTF-8 text (byte 0xe9 at column 6)"),
    (b"\xef\xbb\xbf" + RTE_HEADER + b"0\ta\tb\tentailment\n\xff\n",  # after a byte-order mark
     "train.tsv:3: not UTF-8 text (byte 0xff at column 1)"),
    (RTE_HEADER.replace(b"label", b"lab\x80el"), "train.tsv:1: not UTF-8 text (byte 0x80 at column 30)"),
])
def test_non_utf8_bytes_in_a_tsv_name_the_file_and_line(tmp_path, content, where):
    from selectune.tasks.glue import GLUE, read_tsv

    path = tmp_path / "train.tsv"
    path.write_bytes(content)
    with pytest.raises(SelectuneError) as info:
        read_tsv(GLUE["rte"], path)
    assert str(info.value).startswith(f"{tmp_path / where}; save the file as UTF-8"), str(info.value)


def test_a_malformed_row_error_quotes_at_most_200_characters(tmp_path):
    from selectune.tasks.glue import GLUE, read_tsv

    path = tmp_path / "train.tsv"
    path.write_text(RTE_HEADER.decode() + "0\t" + "x" * 100_000 + "\n")
    with pytest.raises(SelectuneError) as info:
        read_tsv(GLUE["rte"], path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: malformed row: expected at least 4 tab-separated fields, found 2: '0\\txxx")
    assert len(message) < len(str(path)) + 320 and message.endswith("x…'"), message
    path.write_text(RTE_HEADER.decode() + "0\ta\tb\t" + "y" * 10_000 + "\n")
    with pytest.raises(SelectuneError, match=r":2: malformed row: label 'y{200}…' is not one of entailment"):
        read_tsv(GLUE["rte"], path)


def test_train_on_a_non_utf8_tsv_fails_in_one_line(glue_root, tmp_path):
    import shutil

    from conftest import TINY, run_cli

    root = tmp_path / "data"
    shutil.copytree(glue_root, root)
    with (root / "glue" / "RTE" / "train.tsv").open("ab") as handle:
        handle.write(b"99\tna\xefve\tb\tentailment\n")
    result = run_cli("train", "recipe=glue/rte_full", *TINY, cwd=tmp_path, env={"SELECTUNE_DATA": str(root)})
    cli_failure(result, f"{root / 'glue' / 'RTE' / 'train.tsv'}:50: not UTF-8 text (byte 0xef at column 6)")
    assert not (tmp_path / "runs").exists()


def test_non_utf8_bytes_in_a_vtab_list_name_the_file_and_line(tmp_path):
    from selectune.tasks.vtab import read_list

    path = tmp_path / "train800.txt"
    path.write_bytes(b"images/000.jpg 1\nimages/\xc3(.jpg 2\n")
    with pytest.raises(SelectuneError, match=r"train800.txt:2: not UTF-8 text \(byte 0xc3 at column 8\)"):
        read_list(path, 47)
    path.write_text("images/" + "z" * 5000 + ".jpg\n")
    with pytest.raises(SelectuneError) as info:
        read_list(path, 47)
    assert len(str(info.value)) < len(str(path)) + 300 and "z…'" in str(info.value)


# ------------------------------------------------------------------------------- method settings, validate
@pytest.mark.parametrize(("recipe", "override", "problem"), [
    ("glue/rte_lora", "method.r=0", "method.r=0: must be positive (method lora)"),
    ("glue/rte_lora", "method.r=-2", "method.r=-2: must be positive"),
    ("glue/rte_lora", "method.alpha=0", "method.alpha=0.0: must be positive"),
    ("glue/rte_lora", "method.dropout=1.0", "method.dropout=1.0: must be in [0, 1)"),
    ("glue/rte_lora", "+method.lr=-1e-3", "method.lr=-0.001: must be positive"),
    ("glue/rte_spt_lora", "method.rank=0", "method.rank=0: must be positive (method spt_lora)"),
    ("glue/rte_spt_adapter", "method.rank=0", "method.rank=0: must be positive (method spt_adapter)"),
    ("glue/rte_spt_lora", "method.probe_batches=0", "method.probe_batches=0: must be positive"),
    ("glue/rte_adalora", "method.delta_t=0", "method.delta_t=0: must be positive"),
    ("glue/rte_adalora", "method.t_init=-1", "method.t_init=-1.0: must not be negative"),
    ("glue/rte_adalora", "method.beta1=1.5", "method.beta1=1.5: must be in [0, 1)"),
    ("glue/rte_adalora", "method.target_total=0", "method.target_total=0: must be positive"),
    ("glue/rte_sdiff", "method.group_rows=0", "method.group_rows=0: must be positive"),
    ("glue/rte_sdiff", "method.phase1_share=1.0", "method.phase1_share=1.0: must be in (0, 1)"),
    ("glue/rte_sdiff", "method.l0_weight=-1", "method.l0_weight=-1.0: must not be negative"),
    ("glue/rte_sdiff", "method.stretch_left=0.1", "method.stretch_left=0.1, stretch_right=1.5: the stretch needs"),
    ("glue/rte_udiff", "method.stretch_right=1.0", "method.stretch_left=-1.5, stretch_right=1.0: the stretch needs"),
    ("glue/rte_sdiff", "method.group_penalty=mine", "method.group_penalty=mine: use reference or paper"),
    ("glue/rte_sara", "method.threshold=0", "method.threshold=0.0: must be positive"),
])
def test_a_method_setting_no_run_can_use_fails_at_config_time(recipe, override, problem):
    from selectune.commands import RunSpec

    with pytest.raises(SelectuneError) as info:
        RunSpec.from_config(compose_run(recipe, override))
    assert str(info.value) == problem or str(info.value).startswith(problem), str(info.value)


@pytest.mark.parametrize("command", ["train", "validate"])
def test_method_r_0_on_the_command_line(data_env, tmp_path, command):
    from conftest import TINY, run_cli

    result = run_cli(command, "recipe=glue/rte_lora", *TINY, "method.r=0", cwd=tmp_path)
    cli_failure(result, "method.r=0: must be positive (method lora)")
    assert not (tmp_path / "runs").exists()


def test_eval_with_batch_size_0_fails_in_one_line(runs, glue_root, tmp_path):
    import shutil

    from conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(runs["lora"].parent, run)
    before = sorted(p.name for p in run.iterdir())
    result = run_cli("eval", f"run={run}", "batch_size=0", cwd=tmp_path, env={"SELECTUNE_DATA": str(glue_root)})
    cli_failure(result, "batch_size=0: must be a positive whole number of examples")
    assert sorted(p.name for p in run.iterdir()) == before


def test_validate_rejects_the_schedule_train_rejects(data_env, tmp_path):
    """An AdaLoRA schedule that cannot fit the run (t_init + t_final of 4 steps >= the run's 4 steps):
    train refuses it before its first step, and validate now refuses it with the same line."""
    from conftest import TINY, run_cli

    args = ["recipe=glue/rte_adalora", *TINY, "task.max_train_examples=64", "trainer.max_steps=4",
            "method.delta_t=1", "method.t_init=2", "method.t_final=2"]
    problem = "AdaLoRA schedule: t_init (2) + t_final (2) must be less than the run's 4 steps"
    train_line = cli_failure(run_cli("train", *args, cwd=tmp_path), problem)
    assert cli_failure(run_cli("validate", *args, cwd=tmp_path), problem) == train_line
    ok = run_cli("validate", *args[:-2], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "schedule: 4 steps (6 per epoch of 48 training examples)" in ok.stdout
    assert not (tmp_path / "runs").exists()
