r"""The next round of tuning: train the best configuration longer, or search
a search space widened where the best trial touched its boundary.

The playbook, "Deciding how long to train when training is compute-bound"
(Round 2: very few long runs on good hyperparameter points), and
"Identifying bad search space boundaries".

  python -m tuning_playbook.playbook next_round --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_round2 --from_study=runs/cnn_study --steps_factor=2 --run

trains the best trial of --from_study with max_train_steps x F. The schedule
keeps its shape where the playbook's pitfall ("using all the extra training
steps with too small of a learning rate") lies: a linear schedule keeps its
decay length and holds the peak rate longer (hold_steps += (F - 1) x
max_train_steps, decay_steps fixed at the old decay length); a cosine one
keeps its base learning rate and stretches hold and decay to the new length.

  python -m tuning_playbook.playbook next_round --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_widened --from_study=runs/cnn_study --widen --run

writes an ordinary quasi-random study of --from_study's search space with
every range whose best trial lies near its edge (the analysis' near_boundary
check) moved out to the suggested bound, --num_trials trials (default: as
many as --from_study).
"""

from __future__ import annotations

from typing import Any, Mapping

from matplotlib.figure import Figure
import ml_collections

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt
from tuning_playbook.analysis.report_html import Section
from tuning_playbook.analysis import search_space_checks
from tuning_playbook.analysis import study_data
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import from_study
from tuning_playbook.procedures import SaveFigure
from tuning_playbook.studies import study as study_lib

NAME = "next_round"
DESCRIPTION = "Round 2 (train the best longer) or a widened search space."
NEEDS_FROM_STUDY = True

ARGUMENTS = (
    Argument("steps_factor", "float", None,
             "Train the best trial with max_train_steps x this (> 1)."),
    Argument("widen", "bool", False,
             "Widen the ranges the near_boundary check flags instead."),
    Argument("num_trials", "int", None,
             "Trials of the widened study (default: as many as --from_study)."),
    Argument("top_k", "int", 1,
             "With --steps_factor: train the best K trials longer (Round 2 "
             "re-checks the top few at the longer length)."),
)
REFERENCE = "from_trial"


def longer_schedule(config: ml_collections.ConfigDict,
                    factor: float) -> dict[str, Any]:
  """The overrides that train `factor` x longer with the schedule's shape."""
  steps = int(config.max_train_steps)
  new = int(round(steps * factor))
  opt = config.optimizer
  out = {"max_train_steps": new}
  if opt.schedule == "linear":
    decay = opt.decay_steps or (steps - opt.hold_steps - (
        opt.warmup_steps if opt.warmup_mode == "included" else 0))
    out["optimizer.hold_steps"] = int(opt.hold_steps + new - steps)
    out["optimizer.decay_steps"] = int(decay)
  elif opt.schedule == "cosine":
    out["optimizer.hold_steps"] = int(round(opt.hold_steps * factor))
    out["optimizer.decay_steps"] = int(round(opt.decay_steps * factor))
  return out


def widened_space(source: from_study.Source,
                  thresholds: findings_lib.Thresholds
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The source's search space with the flagged ranges widened, and what
  changed ({dimension: {side, old_bound, new_bound}}); ProcedureError when
  no range can move."""
  space, changes = moved_space(source, thresholds, "--widen")
  if not changes:
    raise ProcedureError(
        f"--widen: the best trial of {source.study_dir} is near no boundary "
        "that can move (one short of a natural limit, with feasible trials "
        "beyond it); nothing to widen (run the "
        "instability_check procedure when only infeasible trials lie beyond)")
  return space, changes


def moved_space(source: from_study.Source, thresholds: findings_lib.Thresholds,
                flag: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """The source's search space with every range the boundary check flags
  moved to its suggested bound (none when nothing is flagged), and what
  changed; ProcedureError naming `flag` for a space it cannot rebuild."""
  record = study_lib.read_study_json(source.study_dir)
  if record is None:
    raise ProcedureError(f"--from_study={source.study_dir}: {flag} needs one "
                         "study.json (not a directory of studies)")
  hits = [f for f in search_space_checks.near_boundary(source.study, thresholds)
          if not f.details["infeasible_beyond"]
          and f.details["suggested_bound"] is not None]
  groups: dict[str, dict[str, Any]] = {"nuisance": {}, "scientific": {}}
  for name, spec in (record.get("search_space") or {}).items():
    spec = dict(spec)
    role = spec.pop("role", "nuisance")
    if spec.pop("condition", None) or spec.pop("param", name) != name:
      raise ProcedureError(f"{flag}: {name} is a conditional parameter, "
                           "which cannot be rebuilt from study.json")
    groups["scientific" if role == "scientific" else "nuisance"][name] = spec
  changes = {}
  for f in hits:
    name, side = f.details["dimension"], f.details["side"]
    spec = groups["nuisance"].get(name) or groups["scientific"].get(name)
    changes[name] = {"side": side, "old_bound": spec[side],
                     "new_bound": f.details["suggested_bound"]}
    spec[side] = f.details["suggested_bound"]
  description = ("Widened: " + ", ".join(
      f"{k} {v['side']} {fmt(v['old_bound'])} -> {fmt(v['new_bound'])}"
      for k, v in changes.items())) if changes else "The same ranges."
  space = {"description": description,
           "algorithm": (record.get("sampler") or {}).get("algorithm",
                                                           "quasi_random"),
           "scientific_mode": "joint", "fixed": dict(record.get("fixed") or {})}
  space.update({k: v for k, v in groups.items() if v})
  return space, changes


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: from_study.Source) -> Plan:
  """One longer trial (--steps_factor) or a widened study (--widen)."""
  factor, widen = args["steps_factor"], args["widen"]
  if (factor is None) == (not widen):
    raise ProcedureError("give exactly one of --steps_factor=F and --widen")
  source_best = source.top(1)[0]
  common = {"source_best_value": source_best.best_value,
            "source_trial": source_best.trial_id}
  if widen:
    if args.get("top_k", 1) != 1:
      raise ProcedureError("--top_k goes with --steps_factor (a widened study "
                           "samples its own trials)")
    space, changes = widened_space(source, findings_lib.Thresholds())
    n = args["num_trials"] or len(source.study.trials)
    if n < 1:
      raise ProcedureError(f"--num_trials={n}: must be >= 1")
    return Plan(space, {"mode": "widen", "widened": changes, "num_trials": n,
                        **common}, num_trials=n)
  if not factor > 1:
    raise ProcedureError(f"--steps_factor={factor}: must be > 1 (round 2 "
                         "trains longer)")
  fixed = longer_schedule(config, factor)
  opt = config.optimizer
  space = {"description": f"Round 2: the best trial, {factor:g}x longer.",
           "algorithm": "grid", "fixed": fixed}
  references = from_study.best_references(source, args.get("top_k", 1))
  if len(references) > 1:
    # Each trial's own schedule, stretched: its warmup and decay may differ.
    shared, own = from_study.split_common([
        {**r.overrides, **longer_schedule(study_lib.resolve_trial_config(
            config, r.overrides, what=f"--from_study trial {r.trial_id}"), factor)}
        for r in references])
    space = {"description": (f"Round 2: the best {len(references)} trials, "
                             f"{factor:g}x longer."),
             "algorithm": "grid", "fixed": shared,
             "nuisance": {REFERENCE: {"values": own}}}
    common["source_trials"] = [r.trial_id for r in references]
  parameters = {"mode": "longer", "steps_factor": factor,
                "schedule": opt.schedule,
                "old": {"max_train_steps": int(config.max_train_steps),
                        "hold_steps": int(opt.hold_steps),
                        "decay_steps": int(opt.decay_steps),
                        "warmup_steps": int(opt.warmup_steps)},
                "new": fixed, **common}
  return Plan(space, parameters)


def _figure(study: study_data.Study, source: study_data.Study | None,
            source_trial: str) -> Figure:
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.add_subplot()
  metric = study.objective.metric
  for trial in study.trials:
    s, v = trial.series(metric)
    ax.plot(s, v, label=f"round 2 ({trial.trial_id})")
  if source is not None:
    for trial in source.trials:
      if trial.trial_id == source_trial:
        s, v = trial.series(metric)
        ax.plot(s, v, ls="--", label=f"source trial {trial.trial_id}")
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.legend(fontsize=8)
  return fig


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """How the longer run (or the widened study) compares with the source."""
  params = study.procedure["parameters"]
  metric, sign = study.objective.metric, (1 if study.objective.mode == "min" else -1)
  best = study.best_trial()
  source_value = params["source_best_value"]
  value = best.best_value if best else None
  improved = value is not None and sign * (value - source_value) < 0
  details = {"mode": params["mode"], "metric": metric,
             "source_trial": params["source_trial"],
             "source_best_value": source_value,
             "best_trial": best.trial_id if best else None, "best_value": value,
             "difference": None if value is None else value - source_value,
             "improved": improved}
  source_dir = from_study.find_study_dir(params)
  source = study_data.load_study(source_dir) if source_dir else None
  found = []
  if params["mode"] == "widen":
    still = [f.details["dimension"] for f in
             search_space_checks.near_boundary(study, findings_lib.Thresholds())
             if f.details["suggested_bound"] is not None]
    ranges = "; ".join(f"{k} {v['side']} {fmt(v['old_bound'])} -> "
                       f"{fmt(v['new_bound'])}" for k, v in params["widened"].items())
    message = (f"Widened search space ({ranges}), {len(study.trials)} trials: "
               + (f"best {metric} {fmt(value)} (trial {best.trial_id}) against "
                  f"{fmt(source_value)} in the source study"
                  + (", better." if improved else ", not better.")
                  if best else "no feasible trial yet."))
    if still:
      message += (f" The best trial is again near the edge of "
                  f"{', '.join(still)}: see the near_boundary finding.")
    found.append(Finding(f"{NAME}/widened", NAME, findings_lib.INFO, message,
                         {**details, "widened": params["widened"],
                          "still_near_boundary": still}))
    figure = None
  else:
    fraction = (best.best_step / best.total_train_steps
                if best and best.best_step is not None and best.total_train_steps
                else None)
    message = (f"Round 2: the best trial ({params['source_trial']}) trained "
               f"{params['steps_factor']:g}x longer (max_train_steps "
               f"{params['old']['max_train_steps']} -> "
               f"{params['new']['max_train_steps']}, {params['schedule']} "
               "schedule" + (f", hold_steps {params['new'].get('optimizer.hold_steps')}"
                             f", decay_steps {params['new'].get('optimizer.decay_steps')}"
                             if params["schedule"] != "constant" else "") + "): "
               + (f"{metric} {fmt(value)} against {fmt(source_value)}"
                  + (" (better)" if improved else " (not better)")
                  + f", best step at {fraction:.0%} of training."
                  if best else "no feasible result yet."))
    found.append(Finding(f"{NAME}/longer", NAME, findings_lib.INFO, message,
                         {**details, "steps_factor": params["steps_factor"],
                          "schedule": params["schedule"], "old": params["old"],
                          "new": params["new"], "best_step_fraction": fraction}))
    figure = _figure(study, source, params["source_trial"])
  images = []
  if figure is not None:
    image = save_figure(figure, "next_round_curves",
                        f"{metric}: round 2 against the source trial")
    images = [image] if image else []
  section = Section(
      NAME, "Next round",
      "Round 2: the best configuration trained longer, its schedule stretched "
      "the way the playbook advises; or a new study over a search space "
      "widened where the best trial lay near a boundary.",
      images=images)
  return found, section
