"""SCoRe: the stage objectives on real rollouts, the collapse warning, and the recipe end to
end through the CLI (stored traces, adapters, metrics, ablation flags, resume)."""

import json
import pathlib

import pytest
import torch

from selfevolve.data import arith
from selfevolve.data.store import TraceStore
from tests.recipes.pins import assert_pinned
from tests.recipes.resume import check_kill_and_resume, check_kill_at_and_resume, check_sigint_and_resume
from tests.test_cli import cli

SMALL = ["recipe=score", "stage1_steps=1", "stage2_steps=2", "batch_tasks=8", "train_tasks=40", "eval_limit=8",
         "val_limit=8", "eval_every=2", "checkpoint_every=1", "max_new_tokens=24"]


def _cfg(tmp_path, **kw):
    from selfevolve.config import build
    from selfevolve.recipes.score import ScoreConfig
    return build(ScoreConfig, {"recipe": "score", "run_dir": str(tmp_path / "r"), "max_new_tokens": 24, **kw})


def test_stage_objectives_on_real_rollouts(tiny, tmp_path):
    from selfevolve.recipes.score import rollouts, score_loss
    from selfevolve.run import Run
    from selfevolve.training.learner import episode_batch, trainable_model

    cfg = _cfg(tmp_path)
    run = Run(cfg)
    traces, _ = rollouts(tiny, arith.tasks("train", n=16), run.verifier, cfg, 0, run)
    assert all(len(t.turns) == 2 and t.turns[1].score is not None for t in traces)
    torch.manual_seed(0)  # the adapter's initialisation: the same whatever ran before in this process
    learner = trainable_model("tiny", r=4, alpha=8)
    batches = episode_batch(traces, tiny.tokenizer, tiny.pad_id, cfg.instruction)
    r1 = torch.tensor([1.0, 0.0] * 8)
    r2 = torch.tensor([1.0, 1.0, 0.0, 0.0] * 4)
    # a fresh adapter is the base model: no KL yet, and the learner scores the sampled tokens
    # as the policy that sampled them did (the continuous sync check)
    served = [tuple((turn.token_ids, turn.logprobs) for turn in t.turns[:2]) for t in traces]
    assert all(lps for pair in served for _, lps in pair)
    _, s1 = score_loss(learner, batches, r1, r2, 1, cfg, served=served)
    assert s1["unmatched_rows"] == 0  # every attempt's sampled tokens are the trained ones
    assert s1["logprob_ratio"] == pytest.approx(1.0, abs=1e-4) and s1["logprob_kl"] == pytest.approx(0.0, abs=1e-6)
    assert s1["pg_t1"] == 0.0 and s1["kl_t1"] == pytest.approx(0.0, abs=1e-6)  # Stage I: no reward on y1
    _, s2 = score_loss(learner, batches, r1, r2, 2, cfg)
    assert s2["pg_t1"] != 0.0
    # move the adapter: KL becomes positive, and the first attempt's weight is β2 in Stage I
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    loss1, s1 = score_loss(learner, batches, r1, r2, 1, cfg, served=served)
    assert s1["logprob_kl"] > cfg.logprob_check  # the server never got these weights
    assert s1["kl_t1"] > 0 and s1["kl_t2"] > 0 and s1["penalty_t1"] > 0
    assert s1["penalty_t2"] == 0.0  # Eq. 3: no KL on the second attempt in Stage I
    assert loss1.item() == pytest.approx(s1["pg_t2"] + s1["penalty_t1"], abs=1e-4)
    # the paper's instantaneous credit (the default): y1 keeps r(y1) whatever α
    _, a = score_loss(learner, batches, r1, r2, 2, _cfg(tmp_path, alpha=0.0))
    _, b = score_loss(learner, batches, r1, r2, 2, cfg)
    assert a["pg_t1"] == pytest.approx(b["pg_t1"]) and a["pg_t2"] != pytest.approx(b["pg_t2"])
    # trajectory credit (γ = 1): the bonus reaches y1's credit too
    _, a = score_loss(learner, batches, r1, r2, 2, _cfg(tmp_path, alpha=0.0, credit="trajectory"))
    _, b = score_loss(learner, batches, r1, r2, 2, _cfg(tmp_path, credit="trajectory"))
    assert a["pg_t1"] != pytest.approx(b["pg_t1"]) and a["pg_t2"] != pytest.approx(b["pg_t2"])


def test_collapse_warning():
    from selfevolve.evaluation.protocol import collapse

    ok = {"stage": 2, "edit_ratio": 0.05, "delta": 0.01}
    assert collapse([ok], 0.002, 2) is None
    assert "copies the first" in collapse([{**ok, "edit_ratio": 0.0}], 0.002, 2)
    assert collapse([{**ok, "delta": 0.0}], 0.002, 2) is None  # one evaluation is not a pattern
    assert "revisions do not help" in collapse([{**ok, "delta": 0.0}, {**ok, "delta": -0.01}], 0.002, 2)
    assert collapse([{**ok, "delta": 0.0, "stage": 1}, {**ok, "delta": -0.01}], 0.002, 2) is None  # Stage I


def test_two_step_run_through_the_cli(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    store = TraceStore(d / "traces.sqlite")
    steps = {s: store.query(round=s, meta={"stage": 1 if s == 0 else 2}) for s in range(3)}
    assert [len(v) for v in steps.values()] == [8, 8, 8]
    assert {t.policy_version for t in steps[0]} == {None}          # the base model sampled step 1
    assert {t.policy_version for t in steps[1]} == {"step-1"}      # then each update, synced
    assert {t.policy_version for t in steps[2]} == {"step-2"}
    assert all(len(t.turns) == 2 and all(x.feedback is not None for x in t.turns) for v in steps.values() for t in v)
    assert sorted(p.name for p in (d / "adapters").iterdir()) == ["final", "step-3"]
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "reward_t1" in m]
    assert_pinned(d, loss=-0.36498, kl_t1=0.0, kl_t2=0.0, reward_t1=0.625, reward_t2=0.25)
    # Stage II's first step: y1's policy gradient under the paper's instantaneous credit
    assert_pinned(d, step=2, loss=-2.56311, pg_t1=-0.32227, pg_t2=-2.24112, kl_t1=0.016, reward_t2=0.5)
    assert [m["step"] for m in train] == [1, 2, 3] and [m["stage"] for m in train] == [1, 2, 2]
    for k in ("reward_t2", "kl_t1", "kl_t2", "loss", "time_generate", "time_verify", "time_train", "time_sync"):
        assert all(k in m for m in train)
    evals = [(m["eval"], m["split"]) for m in lines if "eval" in m]  # the test split: before, and the final model
    assert evals == [("before", "test"), ("step-1", "validation"), ("step-2", "validation"),
                     ("step-3", "validation"), ("after", "test")]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["after"]["n"] == 8 and [e["step"] for e in summary["evaluations"]] == [1, 2, 3]
    assert summary["protocol"]["reported_on"] == "test" and summary["protocol"]["feedback"] == "intrinsic"
    assert summary["after"]["budget"]["k"] == 2 and "maj_at_k" in summary["after"]


def test_ablation_without_stage_one(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, "stage1_steps=0", "alpha=0", f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    store = TraceStore(d / "traces.sqlite")
    assert store.count(meta={"stage": 1}) == 0 and store.count(meta={"stage": 2}) == 16


def test_second_attempts_grouped_under_each_first(tmp_path):
    """`y2_samples=2`: each first attempt gets two second attempts, stored as two episodes
    that share it (`meta.group`), and the update trains on them."""
    d = tmp_path / "run"
    r = cli("run", *SMALL, "stage1_steps=0", "stage2_steps=1", "y2_samples=2", f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    groups: dict[str, list] = {}
    for t in TraceStore(d / "traces.sqlite").query(round=0, meta={"stage": 2}):
        groups.setdefault(t.meta["group"], []).append(t)
    assert len(groups) == 8 and all(len(g) == 2 for g in groups.values())
    assert all(len({t.turns[0].response for t in g}) == 1 and len({t.id for t in g}) == 2 for g in groups.values())
    train = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if "reward_t2" in x]
    assert len(train) == 1 and train[0]["pg_t2"] != 0.0


@pytest.mark.slow  # the deterministic kill and the Ctrl-C tests below resume SCoRe in the default run
def test_killed_and_resumed_run_ends_the_same(tmp_path):
    check_kill_and_resume(SMALL, tmp_path)


def test_killed_after_a_publish_that_follows_a_checkpoint_resumes(tmp_path):
    """The checkpoint at step 2 refers to adapters/step-2; step 3 publishes step-3 and used
    to delete step-2 at once, so a run killed before the step-4 checkpoint could not resume
    ("adapters/step-2: not a peft adapter directory")."""
    args = [*SMALL[:2], "stage2_steps=3", *SMALL[3:-2], "checkpoint_every=2", "max_new_tokens=24"]

    def after_step_3_before_checkpoint_4(lines, state):
        return any(m.get("step") == 3 for m in lines) and state is not None and state["step"] == 2

    check_kill_at_and_resume(args, tmp_path, after_step_3_before_checkpoint_4)


def test_ctrl_c_checkpoints_and_resumes(tmp_path):
    # checkpoint_every is far away: the stop request itself makes the next step checkpoint
    check_sigint_and_resume([*SMALL[:-2], "checkpoint_every=100", "max_new_tokens=24"], tmp_path)


def test_micro_batches_give_the_full_batch_loss_and_gradient(tiny, tmp_path):
    """micro_batch_size changes memory, not the update: the same loss and the same gradient
    (to fp32 rounding) as one pass over the whole batch, in both stages."""
    from selfevolve.recipes.score import rollouts, score_loss
    from selfevolve.run import Run
    from selfevolve.training.learner import episode_batch, trainable_model

    cfg = _cfg(tmp_path)
    traces, _ = rollouts(tiny, arith.tasks("train", n=10), Run(cfg).verifier, cfg, 0, Run(_cfg(tmp_path / "b")))
    episode = episode_batch(traces, tiny.tokenizer, tiny.pad_id, cfg.instruction)
    r1, r2 = torch.tensor([1.0, 0.0] * 5), torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0] * 2)
    learner = trainable_model("tiny", r=4, alpha=8)
    torch.manual_seed(0)
    for p in learner.parameters():  # a non-zero adapter, so the KL term has a gradient too
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    params = [p for p in learner.parameters() if p.requires_grad]
    for stage in (1, 2):
        grads = []
        for mbs in (None, 3):
            learner.zero_grad()
            loss, parts = score_loss(learner, episode, r1, r2, stage, cfg.model_copy(update={"micro_batch_size": mbs}),
                                     backward=True)
            grads.append((float(loss), parts, torch.cat([p.grad.flatten() for p in params])))
        (l_full, p_full, g_full), (l_mb, p_mb, g_mb) = grads
        assert l_mb == pytest.approx(l_full, abs=1e-5) and p_mb == pytest.approx(p_full, abs=1e-4)
        assert torch.allclose(g_mb, g_full, atol=1e-6, rtol=1e-4) and g_full.abs().sum() > 0


def test_a_run_stopped_by_a_non_finite_value_resumes_from_its_last_good_checkpoint(tmp_path, monkeypatch):
    """A divergence at step 3 (injected: the checked step raises as it would on a NaN) stops
    the run after the step-2 checkpoint; its adapter is still there, and resuming ends as an
    uninterrupted run does."""
    from selfevolve.config import resolve
    from selfevolve.errors import NonFinite
    from selfevolve.recipes import score
    from selfevolve.run import Run

    args = [*SMALL[:2], "stage2_steps=3", *SMALL[3:-2], "checkpoint_every=2", "max_new_tokens=24"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli("run", *args, f"run_dir={whole}").returncode == 0
    real = score.optimizer_step

    def diverge_at_step_3(opt, params, max_norm, loss, where):
        if where == "step 3":
            raise NonFinite(f"{where}: the loss is nan; stopped before the update")
        return real(opt, params, max_norm, loss, where)

    monkeypatch.setattr(score, "optimizer_step", diverge_at_step_3)
    overrides = dict(a.split("=", 1) for a in args[1:])
    yaml_path = pathlib.Path(score.__file__).parent / "configs" / "score.yaml"
    cfg = resolve(score.ScoreConfig, yaml_path, {**overrides, "recipe": "score", "run_dir": str(cut)})
    torch.manual_seed(cfg.seed)
    with pytest.raises(NonFinite, match="step 3"):
        score.main(cfg, Run(cfg))
    state = torch.load(cut / "checkpoint" / "state.pt", weights_only=False)["recipe_state"]
    assert state["step"] == 2 and (cut / "adapters" / "step-2" / "adapter_config.json").exists()
    r = cli("run", *args, f"run_dir={cut}", "resume=true")
    assert r.returncode == 0, r.stderr
    assert json.loads((cut / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
