"""No file of a run folder is unpickled with weights_only=False: a resume state, the stage-1 latent cache or a
stage-2 latest checkpoint that someone changed into a pickle that runs code gives one line (exit 2) or a clean
recompute, and the code never runs. States are written in types a weights-only load reads back."""

import ast
import enum
import io
import os
import pickle
import re
import shlex
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, stage2_config, tiny_config


class RunsCode:
    """Unpickling this creates `marker` (through os.system): what a tampered file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def tamper(path: Path, marker: Path, **fields) -> Path:
    """A torch.save file at `path` shaped like an advdiff state whose unpickling runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "advdiff.state", **fields, "payload": RunsCode(marker)}, path)
    return path


def test_the_payload_does_run_code_when_unpickled_unsafely(tmp_path):
    """The tests below can fail: plain pickle runs the payload."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


def _one_line_error(capsys, argv, *expect):
    """`advdiff ARGV` (in this process: the exit code the command returns, its stderr) fails with one line."""
    from trainer.cli.main import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("advdiff: error:")]
    assert len(errors) == 1, err[-3000:]
    for part in expect:
        assert part in errors[0], errors[0]
    return errors[0]


# -- (a) resume states ---------------------------------------------------------------------------------
def test_tampered_stage1_resume_state_is_one_line_and_runs_nothing(
    tmp_path, digits_manifest, small_ae, capsys
):
    cfg = tiny_config(tmp_path, digits_manifest, small_ae, max_steps=2, eval_interval=2)
    marker = tmp_path / "ran"
    state = tamper(tmp_path / "out" / "stage1" / "state.pt", marker, stage="stage1", step=1)
    line = _one_line_error(
        capsys,
        ["stage1", str(cfg), "--device", "cpu"],
        str(state),
        "resume state holds posix.system",
        "weights-only",
        "delete it to restart stage1",
    )
    assert not marker.exists(), line
    assert state.is_file()  # left for the user to look at


def test_tampered_stage2_discriminator_state_is_one_line_and_runs_nothing(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capsys
):
    cfg = stage2_config(
        tmp_path,
        digits_manifest,
        small_ae,
        stage1_ckpt,
        stage2={"num_samples": 16},
        discriminator={"epochs": 1},
    )
    marker = tmp_path / "ran"
    state = tamper(
        tmp_path / "out" / "discriminator_iter_0" / "discriminator_state.pt", marker, stage="stage2_d0"
    )
    _one_line_error(
        capsys,
        ["stage2", str(cfg), "--device", "cpu"],
        str(state),
        "holds posix.system",
        "delete it to restart stage2_d0",
    )
    assert not marker.exists()


# -- (b) the stage-1 latent cache ------------------------------------------------------------------------
def test_tampered_latent_cache_is_encoded_again(tmp_path, digits_manifest, small_ae, capsys):
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    cfg = load_config(tiny_config(tmp_path, digits_manifest, small_ae, max_steps=1))
    marker = tmp_path / "ran"
    cache = cfg.out_dir / "stage1" / "dataset_latents.pt"
    cache.parent.mkdir(parents=True)
    torch.save({"key": {}, "latents": RunsCode(marker)}, cache)
    trainer = DiffusionTrainer(cfg, build_accelerator("cpu"))
    assert not marker.exists()
    out = capsys.readouterr()
    assert (
        "latent cache holds posix.system" in out.out + out.err
        and "encoding the rows again" in out.out + out.err
    )
    blob = torch.load(cache, map_location="cpu", weights_only=True)  # replaced by a clean one
    assert torch.allclose(trainer.scaling.to_model(blob["latents"]), trainer.latents)
    DiffusionTrainer(cfg, build_accelerator("cpu"))  # the clean cache is used as it is
    out = capsys.readouterr()
    assert "encoding the rows again" not in out.out + out.err


# -- (c) the stage-2 latest checkpoint read by complete() -------------------------------------------------
def test_tampered_latest_checkpoint_is_one_line_and_runs_nothing(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capsys
):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt)
    marker = tmp_path / "ran"
    latest = tmp_path / "out" / "checkpoints" / "t2_iter_0_checkpoint_latest.pt"
    tamper(latest, marker, complete=True, stage="stage2_g0")
    _one_line_error(
        capsys,
        ["stage2", str(cfg), "--device", "cpu"],
        str(latest),
        "holds posix.system",
        "delete it to restart iteration 0's diffusion phase",
    )
    assert not marker.exists()
    assert not (
        tmp_path / "out" / "discriminator_iter_0" / "fake_latents.pt"
    ).exists()  # stopped before compute


def test_complete_reads_a_clean_checkpoint_and_ignores_a_torn_one(tmp_path):
    from trainer.stage2.run import complete

    class Layout:
        def diffusion_checkpoint(self, k, tag):
            return tmp_path / f"latest_{k}.pt"

    torch.save({"complete": True, "state_dict": {"w": torch.ones(2)}}, tmp_path / "latest_0.pt")
    torch.save({"complete": False}, tmp_path / "latest_1.pt")
    (tmp_path / "latest_2.pt").write_bytes((tmp_path / "latest_0.pt").read_bytes()[:40])  # torn
    assert [complete(Layout(), k) for k in range(4)] == [True, False, False, False]


# -- DeepSpeed's engine checkpoints (DeepSpeed itself unpickles them with weights_only=False) ----------------
def test_engine_state_folder_is_checked_before_deepspeed_loads_it(tmp_path):
    from trainer.core.errors import UserError
    from trainer.files.read import check_torch_files

    folder = tmp_path / "state.deepspeed"
    (folder / "pytorch_model").mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.ones(2)}, "param_shapes": [OrderedDict(w=torch.Size([2]))]},
        folder / "pytorch_model" / "mp_rank_00_model_states.pt",
    )
    check_torch_files(folder, "DeepSpeed state")  # plain files pass
    marker = tmp_path / "ran"
    bad = tamper(folder / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UserError, match=re.escape(f"{bad}: DeepSpeed state holds posix.system")):
        check_torch_files(folder, "DeepSpeed state")
    assert not marker.exists()


def test_deepspeed_plain_data_classes_are_allowed(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an extra")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from trainer.files.read import check_torch_files

    torch.save(
        {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "state": {0: torch.zeros(3)}},
        tmp_path / "optim_states.pt",
    )
    check_torch_files(tmp_path, "DeepSpeed state")


# -- writing states a weights-only load reads back
# ------------------------------------------------------------
class Mode(enum.IntEnum):
    A = 3


def _weights_only_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_plain_converts_what_a_weights_only_load_refuses():
    from trainer.files.atomic import plain

    state = {
        "history": [{"val_mse": np.float64(0.5), "step": np.int64(3), "ok": np.bool_(True)}],
        "path": Path("/a/b"),
        "mode": Mode.A,
        "rng": np.arange(3, dtype=np.uint32),
        "names": {"b", "a"},
        "groups": OrderedDict(lr=[0.1, (0.9, 0.999)]),
        "shape": torch.Size([2, 3]),
        "w": torch.ones(2),
        "dtype": torch.float16,
        "none": None,
    }
    with pytest.raises(pickle.UnpicklingError):
        _weights_only_round_trip(state)
    back = _weights_only_round_trip(plain(state))
    h = back["history"][0]
    assert (h, type(h["val_mse"]), type(h["step"]), type(h["ok"])) == (
        {"val_mse": 0.5, "step": 3, "ok": True},
        float,
        int,
        bool,
    )
    assert back["path"] == "/a/b" and back["mode"] == 3 and type(back["mode"]) is int
    assert (
        back["rng"].dtype == torch.uint32
        and back["rng"].tolist() == [0, 1, 2]
        and back["names"] == ["a", "b"]
    )
    assert back["groups"] == OrderedDict(lr=[0.1, (0.9, 0.999)]) and back["shape"] == torch.Size([2, 3])
    assert torch.equal(back["w"], torch.ones(2)) and back["dtype"] is torch.float16 and back["none"] is None


def test_plain_names_where_an_unknown_object_sits():
    from trainer.files.atomic import plain

    with pytest.raises(TypeError, match=r"state\['model'\]\['sched'\]\[1\]: a builtins.object"):
        plain({"model": {"sched": [1, object()]}})


def test_resume_state_with_numpy_history_still_resumes(tmp_path, digits_manifest, small_ae):
    """A numpy number in the history (a metric computed with numpy) is written as a plain number, so the state
    still loads weights only and the run resumes."""
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    cfg = load_config(tiny_config(tmp_path, digits_manifest, small_ae, max_steps=4, eval_interval=2))
    t = DiffusionTrainer(cfg, build_accelerator("cpu"))
    evaluate = t.evaluate
    t.evaluate = lambda: {k: np.float64(v) for k, v in evaluate().items()}
    t.stop_after = 3
    t.fit()
    state = torch.load(t.state_path, map_location="cpu", weights_only=True)
    assert state["step"] == 3 and type(state["history"][0]["val_mse"]) is float
    again = DiffusionTrainer(cfg, build_accelerator("cpu"))
    assert again.try_resume() and again.step == 3 and again.history == state["history"]


# -- the sources ---------------------------------------------------------------------------------------------
def unsafe_loads(source: str) -> list[int]:
    """Lines of `torch.load(...)` calls that do not pass weights_only=True."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            safe = [
                k
                for k in node.keywords
                if k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            ]
            if not safe:
                bad.append(node.lineno)
    return bad


def test_the_source_check_can_fail():
    assert unsafe_loads(
        "import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\n"
    ) == [2, 3]


def test_no_source_loads_unsafely():
    sources = [p for root in ("trainer", "models", "bench") for p in sorted((REPO / root).rglob("*.py"))]
    assert len(sources) > 50
    text_hits = [
        str(p.relative_to(REPO))
        for p in sources
        if p.parts[len(REPO.parts)] in ("trainer", "models")
        and re.search(r"weights_only\s*=\s*False", p.read_text())
    ]
    assert text_hits == []
    calls = {str(p.relative_to(REPO)): lines for p in sources if (lines := unsafe_loads(p.read_text()))}
    assert calls == {}, "every torch.load passes weights_only=True"
