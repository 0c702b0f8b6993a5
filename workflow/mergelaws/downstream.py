"""Downstream scores of merged models through lm-evaluation-harness (App. K, Table 15, Fig 10).

Cross-entropy is the paper's metric; App. K also scores merged models on downstream tasks (all
subsets of k <= 5 from a 5-expert pool) and finds the scores saturate earlier than CE. This
module runs that path on the field's standard tool, lm-evaluation-harness (``lm_eval``, the
optional extra ``downstream``), through its Python API on the **in-memory** merged model: the
sweep's merge engine (:func:`mergelaws.sweep.build_merger`) writes each subset's merge into the
live model's parameters, and one ``lm_eval.models.huggingface.HFLM`` wrapping that model object
scores it with ``lm_eval.simple_evaluate``; no checkpoint is written (the tests check the
in-memory score equals lm-eval's score of the same model saved and loaded from disk).

Tasks (config ``downstream.tasks``) are lm-eval task names: the harness's own (``arc_easy``,
``gsm8k`` on a cluster with the datasets) or YAMLs in ``downstream.include_path``, plus local
tasks that mergelaws builds from a shipped domain's eval split, named ``mergelaws_<domain>_<kind>``:

- ``answer``: worked solutions whose last line is ``Answer: ...`` (arithmetic, algebra). The
  context is the question (user turn) and the solution's steps (the start of the assistant
  turn, lm-eval's ``gen_prefix``); the four choices are the true ``Answer:`` line and three
  seeded distractors with its last number perturbed. Log-likelihood multiple choice.
- ``mc``: any domain: the question and four candidate responses, the true one and three other
  responses of the same eval split (seeded). Log-likelihood multiple choice.

Both are scored as ``acc`` and ``acc_norm`` (chance 0.25), rendered by the model's own chat
template (``apply_chat_template``, system turn = the config's ``system_prompt``), the path the
experts were trained on; a tokenizer without a chat template gets lm-eval's plain rendering.
The task files are written into a temporary directory per run and removed afterwards.

Each subset's cross-entropy on the pool's eval splits (macro mean over the pool's domains, the
sweep's evaluation) is written beside the scores, as task ``cross_entropy``, metric ``loss``, so
a table holds both curves of the same merged models.

A task-aware method (free_merging) follows the sweep's convention: while a task of domain d
(a local task ``mergelaws_<d>_<kind>``) or d's eval split (the cross-entropy) is scored, d's
own lightweight expert is added to the merge when d's expert is in the subset
(:meth:`mergelaws.merging.SubsetMerger.task_expert`), and removed afterwards. Tasks of the
harness or of ``include_path`` have no known domain: they are scored on the plain merge (logged
once). The tasks are scored one domain at a time (one ``simple_evaluate`` call per domain, the
tasks without a domain together), whatever the method, so two methods' scores differ only by
their merges.

Resume: each finished subset's rows are appended (flushed, fsynced) to ``<out>.partial.jsonl``
beside the output, whose first line records the settings the rows depend on (tasks, limit,
method and its parameters, size, pool, subsets' ids, batch size, lm-eval's version, and the
sweep's fingerprint of the weights, eval settings and domains); a rerun skips the subsets already
there (logged), or discards the file, logged, when a setting changed. The table is written
atomically (parquet, then CSV) and only then is the sidecar removed. lm-eval's loggers are at
WARNING while it runs (restored afterwards); one line per subset says where the job is.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import re
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from mergelaws import data as D
from mergelaws import grid, merging, models
from mergelaws.errors import ConfigError, DataError

COLUMNS = ["size", "params", "method", "k", "subset", "members", "task", "metric", "value", "stderr",
           "n", "higher_is_better"]
LOCAL_PREFIX = "mergelaws_"
KINDS = ("answer", "mc")
CE_TASK = "cross_entropy"
N_CHOICES = 4
PARTIAL_SUFFIX = ".partial.jsonl"
LM_EVAL_LOGGERS = ("lm_eval", "lm-eval")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# ---- local tasks from shipped domains --------------------------------------------------------

def parse_local(name: str) -> tuple[str, str] | None:
    """``mergelaws_<domain>_<kind>`` -> (domain, kind); None for any other task name."""
    if not name.startswith(LOCAL_PREFIX):
        return None
    rest = name[len(LOCAL_PREFIX):]
    domain, _, kind = rest.rpartition("_")
    if not domain or kind not in KINDS:
        raise ConfigError(f"downstream.tasks: {name!r} is not a local task; local tasks are named "
                          f"mergelaws_<domain>_<kind> with kind one of {', '.join(KINDS)}")
    return domain, kind


def _perturb(answer: str, rng: random.Random) -> list[str]:
    """Three distinct distractors of an ``Answer: ...`` line: its last number changed."""
    nums = list(_NUMBER.finditer(answer))
    if not nums:
        return []
    m = nums[-1]
    text = m.group()
    is_int = "." not in text
    v = int(text) if is_int else float(text)
    deltas = [1, -1, 2, -2, 3, -3, 5, -5, 10, -10, 11, -9]
    cands = [v + d for d in deltas] + ([v * 2, -v, v // 2 if is_int else v / 2] if v else [])
    rng.shuffle(cands)
    out: list[str] = []
    for c in cands:
        s = str(c) if is_int else f"{c:g}"
        alt = answer[:m.start()] + s + answer[m.end():]
        if alt != answer and alt not in out:
            out.append(alt)
        if len(out) == N_CHOICES - 1:
            break
    return out


def build_docs(pairs: list[tuple[str, str]], kind: str, seed: int, name: str = "") -> list[dict]:
    """The documents of a local task (deterministic in ``seed``): ``question``, ``prefix`` (the
    assistant turn's start: the steps, for ``answer``), ``choices`` (4) and ``label`` (the
    index of the true one). Pairs with no usable answer line are left out."""
    docs = []
    for i, (prompt, response) in enumerate(pairs):
        rng = random.Random(f"{seed}:{name}:{i}")
        if kind == "answer":
            head, sep, last = response.rpartition("\n")
            if not sep or not last.startswith("Answer:"):
                continue
            gold, prefix = "\n" + last, head
            wrong = ["\n" + w for w in _perturb(last, rng)]
        elif kind == "mc":
            others = sorted({r for j, (_, r) in enumerate(pairs) if j != i and r != response})
            if len(others) < N_CHOICES - 1:
                continue
            gold, prefix = response, ""
            wrong = rng.sample(others, N_CHOICES - 1)
        else:
            raise ValueError(f"unknown local task kind {kind!r}; one of {KINDS}")
        if len(wrong) < N_CHOICES - 1:
            continue
        choices = [gold, *wrong]
        rng.shuffle(choices)
        docs.append({"question": prompt, "prefix": prefix, "choices": choices, "label": choices.index(gold)})
    return docs


def write_local_task(cfg: dict, name: str, out_dir: str | Path, limit: int | None = None) -> Path:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` (an lm-eval task) into ``out_dir``; its YAML path."""
    import yaml

    domain, kind = parse_local(name)
    if domain not in cfg["domains"]:
        raise ConfigError(f"downstream.tasks: {name!r} names domain {domain!r}, which is not under `domains` "
                          f"({', '.join(cfg['domains'])})")
    spec = cfg["domains"][domain]
    pairs = D.read_pairs(spec["eval"], spec["prompt_field"], spec["response_field"], part="eval")
    docs = build_docs(pairs, kind, cfg["seed"], name)
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise DataError(f"downstream.tasks: {name!r}: no example of {spec['eval']} fits kind {kind!r}"
                        + (" (responses must end with an 'Answer: ...' line holding a number)" if kind == "answer"
                           else ""))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": "",  # the choice follows the assistant header (mc) or the steps (answer)
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "source": f"mergelaws: {kind} over {spec['eval']}"},
    }
    if kind == "answer":
        task["gen_prefix"] = "{{prefix}}"
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


# ---- lm-eval on one in-memory model -----------------------------------------------------------

def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("downstream.tasks needs lm-evaluation-harness: pip install 'mergelaws[downstream]' "
                          "(lm-eval==0.4.13)") from None
    return lm_eval, HFLM, TaskManager


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING):
    """lm-eval's loggers (``lm_eval`` and its children, ``lm-eval``) at ``level`` while inside;
    their own levels are restored on exit."""
    loggers = [logging.getLogger(n) for n in LM_EVAL_LOGGERS]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


def wrap_model(model, tokenizer, batch_size: int = 16):
    """An lm-eval ``HFLM`` over an already built transformers model (the live merged model:
    later in-place merges into its parameters are what it scores next)."""
    _, HFLM, _ = _lm_eval()
    with quiet_lm_eval():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def task_manager(include_path: str | list[str] | None, defaults: bool = True):
    """lm-eval's task index over ``include_path``, plus the harness's own tasks unless
    ``defaults`` is false (indexing those takes ~30 s; local tasks do not need them)."""
    _, _, TaskManager = _lm_eval()
    with quiet_lm_eval():
        return TaskManager(include_path=include_path or None, include_defaults=defaults)


def manager_for(tasks: list[str], include: list[str]):
    """The task index for ``tasks``: ``include`` alone (the local tasks' directory, include_path)
    when it holds every task, else with the harness's own tasks too."""
    if include:
        manager = task_manager(include, defaults=False)
        if all(parse_local(t) or t in manager.all_tasks for t in tasks):
            return manager
    return task_manager(include or None)


def score(lm, tasks: list[str], manager, *, limit: int | None = None, system_prompt: str | None = None,
          chat: bool = True) -> list[tuple[str, str, float, float, int, bool]]:
    """(task, metric, value, stderr, n, higher_is_better) for every task and metric lm-eval reports."""
    lm_eval, _, _ = _lm_eval()
    with quiet_lm_eval():
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      apply_chat_template=chat, system_instruction=system_prompt if chat else None,
                                      log_samples=False, bootstrap_iters=100, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
    out = []
    for task in tasks:
        metrics = res["results"].get(task)
        if metrics is None:
            raise ConfigError(f"downstream.tasks: lm-eval returned no result for {task!r} (a group? name its "
                              f"subtasks instead)")
        n = int((res.get("n-samples") or {}).get(task, {}).get("effective", 0))
        hib = res.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or metric in ("alias", "sample_len", "sample_count") \
                    or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            err = float(err) if isinstance(err, (int, float)) else float("nan")
            name = metric if filt in ("", "none") else f"{metric},{filt}"
            out.append((task, name, float(value), err, n, bool(hib.get(metric, True))))
    return out


# ---- the downstream run: merges of chosen subsets, scored -------------------------------------

def settings(cfg: dict) -> dict:
    return dict(cfg.get("downstream") or {})


def pool(cfg: dict) -> list[str]:
    """The expert pool: the first N domains, or the listed ones (config ``downstream.pool``)."""
    doms = grid.domains(cfg)
    p = settings(cfg).get("pool", 5)
    if isinstance(p, int):
        if p > len(doms):
            raise ConfigError(f"downstream.pool = {p} is more than the {len(doms)} configured domains")
        return doms[:p]
    unknown = [d for d in p if d not in doms]
    if unknown:
        raise ConfigError(f"downstream.pool names {unknown}, not under `domains` ({', '.join(doms)})")
    if len(set(p)) != len(p):
        raise ConfigError(f"downstream.pool repeats a domain: {p}")
    return list(p)


def subsets(cfg: dict) -> list[grid.Subset]:
    """The base (k = 0) and every subset of the pool with 1 <= k <= downstream.max_k."""
    p = pool(cfg)
    kmax = min(int(settings(cfg).get("max_k", 5)), len(p))
    return [grid.Subset(k, tuple(sorted(c))) for k in range(kmax + 1) for c in itertools.combinations(p, k)]


def check(cfg: dict, method: str, size: str) -> None:
    s = settings(cfg)
    if not s.get("tasks"):
        raise ConfigError("downstream.tasks is empty; list lm-eval task names (or mergelaws_<domain>_<kind> "
                          "local tasks) to score merged models downstream")
    if method not in cfg["methods"]:
        raise ConfigError(f"--method {method!r} is not under `methods` ({', '.join(cfg['methods'])})")
    if size not in cfg["bases"]:
        raise ConfigError(f"--size {size!r} is not under `bases` ({', '.join(cfg['bases'])})")
    for t in s["tasks"]:
        loc = parse_local(t)
        if loc and loc[0] not in cfg["domains"]:
            raise ConfigError(f"downstream.tasks: {t!r} names domain {loc[0]!r}, which is not under `domains`")
    inc = s.get("include_path")
    if inc and not Path(inc).is_dir():
        raise ConfigError(f"downstream.include_path {inc!r} is not a directory of lm-eval task YAMLs")
    pool(cfg)


def task_domains(tasks: list[str]) -> list[tuple[str | None, list[str]]]:
    """The tasks grouped by their domain (local tasks' ``<domain>``; None: not known), groups in
    order of first appearance: each group is one lm-eval call, under that domain's expert."""
    groups: dict[str | None, list[str]] = {}
    for t in tasks:
        loc = parse_local(t)
        groups.setdefault(loc[0] if loc else None, []).append(t)
    return list(groups.items())


def partial_path(out: str | Path) -> Path:
    """The resume sidecar of a downstream table: ``<out>.partial.jsonl`` beside it."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def resume_settings(cfg: dict, size: str, method: str, base_path, expert_dirs: dict[str, str],
                    chosen: list[grid.Subset]) -> dict:
    """What a downstream table's rows depend on, as recorded in (and compared with) the sidecar."""
    from mergelaws import sweep

    lm_eval, _, _ = _lm_eval()
    s = settings(cfg)
    key = {"size": size, "method": method, "params": cfg["methods"][method], "tasks": list(s["tasks"]),
           "limit": s.get("limit"), "pool": pool(cfg), "subsets": [x.id for x in chosen],
           "batch_size": int(s.get("batch_size", 16)), "include_path": s.get("include_path"),
           "lm_eval": getattr(lm_eval, "__version__", "?"),
           # weights (files' sizes and times), eval settings, domains' files, seed, system prompt, dtype
           "fingerprint": sweep.fingerprint(cfg, size, method, str(base_path), expert_dirs, chosen)}
    return json.loads(json.dumps(key, sort_keys=True, default=str))


class SubsetRows:
    """Finished subsets' rows in the sidecar ``<out>.partial.jsonl``: a header line with the
    settings, then one line per subset ``{"subset": id, "rows": [...]}``, each flushed and
    fsynced as its subset finishes. Opened with other settings, the file is discarded (logged);
    a last line cut by a kill is dropped."""

    def __init__(self, out: str | Path, key: dict, tag: str, log=print):
        self.path = partial_path(out)
        self.done: dict[str, list[tuple]] = {}
        lines, cut = self._read(key, tag, log)
        if lines is None or cut:
            text = json.dumps({"settings": key}, sort_keys=True) + "\n" + "".join(ln + "\n" for ln in lines or [])
            from mergelaws.io import write_text

            write_text(self.path, text)  # fresh, or without the cut line (atomically)

    def _read(self, key: dict, tag: str, log) -> tuple[list[str] | None, bool]:
        """(the subset lines to keep, whether a cut line was dropped); None: start afresh."""
        if not self.path.exists():
            return None, False
        parts = self.path.read_text().split("\n")
        tail = parts.pop()  # "" when the file ends with a whole line
        try:
            old = json.loads(parts[0])["settings"] if parts else None
        except (ValueError, KeyError, TypeError):
            old = None
        if not isinstance(old, dict):
            old = None
        if old != key:
            what = "unreadable" if old is None else "made with other settings: " + ", ".join(
                k for k in sorted(set(key) | set(old)) if old.get(k) != key.get(k))
            log(f"{tag}: discarding {self.path} ({what}); scoring every subset afresh")
            return None, False
        kept = []
        for ln in parts[1:]:
            try:
                rec = json.loads(ln)
                self.done[rec["subset"]] = [tuple(r) for r in rec["rows"]]
            except (ValueError, KeyError, TypeError):
                tail = tail or ln  # a cut or garbled line: it and what follows are dropped
                break
            kept.append(ln)
        return kept, bool(tail)

    def add(self, subset_id: str, rows: list[tuple]) -> None:
        line = json.dumps({"subset": subset_id, "rows": [list(r) for r in rows]}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[subset_id] = list(rows)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def run_downstream(cfg: dict, size: str, method: str, out: str | Path, expert_dirs: dict[str, str] | None = None,
                   log=print) -> pd.DataFrame:
    """Merge every chosen subset (:func:`subsets`) of a size's pool with ``method`` in memory (the
    sweep's engine), score it on ``downstream.tasks`` with lm-eval and on the pool's eval splits
    (cross-entropy), and write one row per (subset, task, metric) to ``out`` (parquet + CSV).
    A task-aware method has each domain's own expert added while that domain's tasks and eval
    split are scored; finished subsets are kept in ``<out>.partial.jsonl`` for a rerun to
    resume from (see the module doc)."""
    from mergelaws import sweep
    from mergelaws.evaluate import evaluate_examples

    check(cfg, method, size)
    s = settings(cfg)
    _lm_eval()
    t0 = time.time()
    params = cfg["methods"][method]
    device = models.resolve_device(cfg["sweep"]["device"])
    doms = pool(cfg)
    chosen = subsets(cfg)
    base_path = grid.base_dir(cfg, size)
    expert_dirs = expert_dirs or {d: grid.expert_dir(cfg, size, d) for d in doms}
    tag = f"downstream {size}/{method}"
    tasks = list(s["tasks"])
    groups = task_domains(tasks)
    progress = SubsetRows(out, resume_settings(cfg, size, method, base_path, expert_dirs, chosen), tag, log)
    tok = models.load_tokenizer(base_path)
    model = models.load_model(base_path, sweep.sweep_dtype(cfg, base_path, expert_dirs, log), device,
                              allow_bin=cfg["allow_bin_checkpoints"])
    model.eval()
    n_params = models.count_params(model)
    live = models.float_state(model)
    merger = sweep.build_merger(cfg, method, params, model, live, base_path, expert_dirs, doms, device, tag, log)
    encoded = {d: D.load_domain(cfg, d, "eval", tok, cfg["eval"]["max_len"], limit=cfg["eval"]["max_examples"])
               for d in doms}
    chat = bool(getattr(tok, "chat_template", None))
    limit = s.get("limit")
    log(f"{tag}: {len(chosen)} subsets (k <= {max(x.k for x in chosen)}) of the pool {', '.join(doms)}; tasks "
        f"{', '.join(tasks)}; limit {limit} examples each; "
        + ("the model's chat template" if chat else "no chat template: lm-eval's plain prompts"))
    if merger.task_aware:
        unknown = [t for d, ts in groups if d is None for t in ts]
        outside = [t for d, ts in groups if d is not None and d not in doms for t in ts]
        if unknown:
            log(f"{tag}: {', '.join(unknown)}: no known domain (not mergelaws_<domain>_<kind>), scored on the "
                f"plain merge, without a task expert")
        if outside:
            log(f"{tag}: {', '.join(outside)}: domain not in the pool, so never with its expert")
    order = list(chosen)
    if merger.reuses_sums:
        order = [chosen[i] for i in merging.reuse_order([x.members for x in chosen])]
    todo = [x for x in order if x.id not in progress.done]
    if progress.done:
        log(f"{tag}: resuming: {len(chosen) - len(todo)} of {len(chosen)} subsets already scored (kept in "
            f"{progress.path}), {len(todo)} to go")
    if todo:
        with tempfile.TemporaryDirectory(prefix="mergelaws-tasks-") as tmp:
            include = [str(write_local_task(cfg, t, tmp, limit).parent) for t in tasks if parse_local(t)]
            if s.get("include_path"):
                include.append(str(Path(s["include_path"]).resolve()))
            manager = manager_for(tasks, sorted(set(include)))
            lm = wrap_model(model, tok, int(s.get("batch_size", 16)))
            done, seconds, replay = len(chosen) - len(todo), [], []
            for sub in order:
                if sub.id in progress.done:
                    if merger.reuses_sums:  # replayed before the next merge: the same float rounding
                        replay.append(sub)
                    continue
                t1 = time.time()
                with torch.no_grad():
                    for r in replay:
                        merger.merge(r.members, r.id, out=live)
                    replay = []
                    merger.merge(sub.members, sub.id, out=live)
                head = (size, n_params, method, sub.k, sub.id, sub.label)
                if merger.last_nonfinite:
                    log(f"{tag}: merge of {sub.label or 'base'} has non-finite weights; its scores are NaN")
                    rows = [(*head, t, "acc", float("nan"), float("nan"), 0, True) for t in tasks]
                else:
                    losses = []
                    for d in doms:  # the sweep's convention: each eval domain with its own expert
                        with merger.task_expert(d, live):
                            losses.append(evaluate_examples(model, encoded[d].examples, pad_id=tok.pad_token_id,
                                                            batch_tokens=cfg["eval"]["batch_tokens"],
                                                            device=device).loss)
                    rows = [(*head, CE_TASK, "loss", float(sum(losses) / len(losses)), float("nan"),
                             sum(len(encoded[d].examples) for d in doms), False)]
                    scores: dict[str, list] = {}
                    for d, group in groups:
                        with merger.task_expert(d, live) if d is not None else contextlib.nullcontext():
                            for r in score(lm, group, manager, limit=limit, system_prompt=cfg.get("system_prompt"),
                                           chat=chat):
                                scores.setdefault(r[0], []).append(r)
                    rows += [(*head, *r) for t in tasks for r in scores.get(t, [])]
                progress.add(sub.id, rows)
                done += 1
                seconds.append(time.time() - t1)
                eta = sum(seconds) / len(seconds) * (len(chosen) - done)
                log(f"{tag} {done}/{len(chosen)} subset={sub.label or 'base'} k={sub.k} {seconds[-1]:.1f}s "
                    f"~{eta:.0f}s left")
    table = pd.DataFrame([r for x in chosen for r in progress.done[x.id]], columns=COLUMNS)  # in subsets' order
    sweep.write_table(table, out, csv=True)  # atomically (temp file + os.replace), then the sidecar goes
    progress.clear()
    log(f"{tag}: {len(chosen)} merges scored ({len(todo)} in this run) in {time.time() - t0:.1f}s -> {out} (+ .csv)")
    return table


# ---- saturation: k at which 90% of the k=1 -> max gain is reached ----------------------------

def normalised(table: pd.DataFrame, task: str, metric: str) -> tuple[pd.Series, pd.DataFrame]:
    """Per-subset values and per-k means of one (task, metric), as the fraction of the gain from
    k = 1 to the largest k (means): 0 at k = 1, 1 at k = max, higher = better for either sign."""
    t = table[(table["task"] == task) & (table["metric"] == metric) & (table["k"] >= 1)].copy()
    sign = 1.0 if bool(t["higher_is_better"].iloc[0]) else -1.0
    means = t.groupby("k")["value"].mean()
    lo, hi = means.iloc[0], means.iloc[-1]
    gain = (hi - lo) * sign
    scale = gain if gain > 0 else float("nan")
    t["norm"] = sign * (t["value"] - lo) / scale
    return sign * (means - lo) / scale, t


def k_at(frac: pd.Series, level: float = 0.9) -> float:
    """The smallest k whose normalised mean reaches ``level`` (NaN if there is no gain)."""
    hit = [k for k, v in frac.items() if math.isfinite(v) and v >= level]
    return float(min(hit)) if hit else float("nan")
