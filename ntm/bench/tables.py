"""Markdown tables of the benchmark results (``results/*.md`` and the tables in README and docs/),
made from the results JSON alone so that every table can be regenerated (``ntm report``)."""
from __future__ import annotations

import math
from pathlib import Path

# the first characters of each table kind (a re-run may replace a file that starts so)
TABLE_PREFIXES = ("| data | model |", "| model | steps |", "| model | objective |", "Finetune ablation on ",
                  "Objective ablation on ", "Lever ablation on ", "| trained on | OOD data |", "| data | method |",
                  "| data | model | T | K |", "| T | level |",
                  "| preset | transform | threads |")


def markdown_table(results: dict) -> str:
    """The bench results as a markdown table. FM rows show their ODE NLL estimate (marked ODE) in
    the bound column and the solver beside the step count."""
    with_steps = any("steps" in r for r in results["rows"])
    if with_steps:
        lines = ["| data | model | T | NLL bound (gap to floor) | IW bound (gap) | energy dist. / noise floor | low-density frac. | train s | samples/s |",
                 "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines = ["| data | model | NLL bound (gap to floor) | IW bound (gap) | energy dist. / noise floor | low-density frac. | train s | samples/s |",
                 "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        low = "n/a" if r["low_density_fraction"] is None else f"{100 * r['low_density_fraction']:.1f}%"
        steps = f"{r.get('steps')}" + (f" {r['solver']}" if r.get("solver") else "")
        iw = "n/a" if r["iw_bound"] is None else f"{r['iw_bound']:.3f} ({r['iw_gap']:+.3f})"
        ode = " (ODE)" if r.get("solver") else ""
        lines.append(
            f"| {r['data']} | {r['model']} | " + (f"{steps} | " if with_steps else "") + f"{r['nll_bound']:.3f} ± {r['nll_bound_se']:.3f} ({r['bound_gap']:+.3f}){ode} "
            f"| {iw} | {r['energy_distance']:.5f} / {r['ed_noise_floor']:.5f} "
            f"= {r['ed_ratio']:.2f}× | {low} | {r['train_seconds']:.0f} | {r['samples_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def markdown_image_table(results: dict, details: bool = True) -> str:
    """The image bench rows as a markdown table (with the NTM recipe and the kind of each bits/dim
    bound when the rows name them), and with ``details`` the per-step bounds the results hold."""
    recipes = any("objective" in r for r in results["rows"])
    head = "| model | steps | decode / solver | NFE | FID | KID ×1e3 | precision | recall | class acc. | bits/dim | img/s | train s |"
    rule = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if recipes:
        head = head.replace("| model |", "| model | objective |").replace(" bits/dim |", " bits/dim | bound |")
        rule += "---|---|"
    lines = [head, rule]
    for r in results["rows"]:
        bpd = "n/a" if r["bpd"] is None or not math.isfinite(r["bpd"]) else f"{r['bpd']:.3f}"
        model = r["model"] + (f" (λ={r['aux_weight']:g}{', frozen backbone' if r.get('backbone') == 'frozen' else ''})"
                              if r.get("aux_weight") is not None else "")
        if recipes:
            model += f" | {r.get('objective') or ''}{' (default)' if r.get('default') else ''}"
            bpd += f" | {r.get('bpd_kind', '')}"
        lines.append(f"| {model} | {r['steps']} | {r['decode'] or r['solver']} | {r['nfe']} | {r['fid']:.3f} | "
                     f"{1e3 * r['kid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {100 * r['class_acc']:.1f}% | "
                     f"{bpd} | {r['img_per_s']:.1f} | {r['train_seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    config = results.get("config", {}) if details else {}
    for by_step in [config.get("by_step")] + list(config.get("by_step_other_T", {}).values()):
        if by_step:
            table += by_step_markdown(by_step)
    return table


def markdown_guidance_table(results: dict) -> str:
    """A guidance sweep (``ntm bench guidance``): one row per model and weight w (and sample seed,
    a column only when the sweep drew more than one)."""
    seeded = results.get("config", {}).get("seeds", 1) > 1
    seed_head, seed_rule = (" sample seed |", "---|") if seeded else ("", "")
    lines = [f"| model | steps | guidance w |{seed_head} NFE | FID | precision | recall | class acc. | img/s |",
             f"|---|---|---|{seed_rule}---|---|---|---|---|---|"]
    for r in results["rows"]:
        seed = f" {r['sample_seed']} |" if seeded else ""
        lines.append(f"| {r['model']} | {r['steps']} | {r['guidance']:g} |{seed} {r['nfe']} | {r['fid']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {100 * r['class_acc']:.1f}% | {r['img_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def by_step_markdown(by_step: dict) -> str:
    """One per-step split of the ELBO (``by_step_table``) as a caption and a table; "net" is the
    step's share of the bound, -log p + log q."""
    t = by_step["times"]
    rows = [f"| {k} | {t[k]:.3f} → {t[k - 1]:.3f} | {nlp:+.4f} | {lq:+.4f} | {nlp + lq:+.4f} |"
            for k, (nlp, lq) in enumerate(zip(by_step["neg_log_p_per_dim"], by_step["log_q_per_dim"]), start=1)]
    return (f"\nPer-step uniform ELBO of the NTM at T = {by_step.get('T', len(t) - 1)}, nats/dim ({by_step['n']} test "
            f"images, {by_step['trajectories']} trajectories; prior -log N(x_1) {by_step['neg_log_prior_per_dim']:+.4f}):\n\n"
            "| step | t → s | -log p | log q | net |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def markdown_objective_ablation_table(results: dict) -> str:
    """The image objective ablation: one row per recipe, same budget."""
    c = results["config"]
    kind = "Lever" if c.get("ablation") == "levers" else "Objective"
    lines = [f"{kind} ablation on {c['data']}: {c['steps']} steps each; FID and class accuracy of {c['n_samples']} "
             f"guided samples (w = {c['guidance']}) at T steps; bits/dim on {c['n_bpd']} test images.", "",
             "| variant | T | objective | stratified | λ | preconditioning | transporter | t_0 in training | FID | class acc. | precision | recall | bits/dim | bound | final NLL /dim | train s | step ÷ FM step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        transporter = f"{r.get('transporter', '2x1 w32')} {r.get('transform', 'affine')}"
        if r.get("splines"):
            transporter += f" ({r['splines']})"
        cost = f"{r['step_cost_vs_fm']:.2f}×" if "step_cost_vs_fm" in r else "—"
        t0 = f"U[0, {r.get('t_min_high', 0.05):g}]" if r.get("t_min_high", 0.05) > 0 else "0"
        lines.append(f"| {r['variant']} | {r.get('steps', 4)} | {r['objective']} | {'yes' if r['stratified'] else 'no'} | "
                     f"{r['hybrid_weight']:g} | {r['precondition']} | {transporter} | {t0} | {r['fid']:.3f} | {100 * r['class_acc']:.1f}% | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['bpd']:.3f} | {r['bpd_kind']} | {r['final_nll']:.4f} | {r['train_seconds']:.0f} | {cost} |")
    return "\n".join(lines) + "\n"


def markdown_ablation_table(results: dict) -> str:
    """The finetune ablation rows as a caption and a markdown table."""
    c = results["config"]
    lines = [f"Finetune ablation on {c['data']}: {c['steps']} steps, λ = {c['aux_weight']}; bits/dim on {c['n_bpd']} "
             f"test images; FID on {c['n_samples']} samples (w = {c['guidance']}).", "",
             "| variant | scale | τ_0 | pretrained lr | fresh lr | bits/dim | FID | class acc. | precision | recall | log-det t=0 /dim |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lrs = "— | —" if r["fresh_lr"] is None else f"{r['pretrained_lr']:g} | {r['fresh_lr']:g}"
        lines.append(f"| {r['variant']} | {r['velocity_scale']} | {r['tau0']:g} | {lrs} | "
                     f"{r['bpd']:.3f} | {r['fid']:.3f} | {100 * r['class_acc']:.1f}% | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['logdet_t0_per_dim']:.3f} |")
    return "\n".join(lines) + "\n"


def markdown_ood_table(results: dict) -> str:
    """Out-of-distribution detection: one row per (trained on, out-of-distribution set, statistic)."""
    lines = ["| trained on | OOD data | statistic | AUROC | AUPR | bits/dim in / out | NFE per image | s per 1000 | n in / out |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        bpd = f"{r['bpd_in']:.2f} / {r['bpd_out']:.2f}" if "bpd_in" in r else "–"
        lines.append(f"| {r['train_data']} | {r['ood_data']} | {r['method']} | {r['auroc']:.3f} | {r['aupr']:.3f} | {bpd} "
                     f"| {r['nfe_per_image']} | {r['seconds_per_1000']:.1f} | {r['n_in']} / {r['n_out']} |")
    return "\n".join(lines) + "\n"


def markdown_bayes_table(results: dict) -> str:
    """Bayes classification by class-conditional likelihoods against the CNN."""
    lines = ["| data | method | K | accuracy | ECE | n | s per 1000 |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        sec = f"{r['seconds_per_1000']:.0f}" if "seconds_per_1000" in r else "–"
        lines.append(f"| {r['data']} | {r['method']} | {r.get('trajectories', '–')} | {100 * r['accuracy']:.2f}% "
                     f"| {r['ece']:.4f} | {r['n']} | {sec} |")
    return "\n".join(lines) + "\n"


def markdown_text_table(results: dict) -> str:
    """Text-to-image on the canvas: GenEval-style accuracies per task, held-out splits and FID."""
    lines = ["| model | steps | guidance | overall | single | two | counting | colours | position | colour attr. "
             "| held-out phrasing (seen) | held-out pair (seen) | FID | img/s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['steps']} | {r['guidance']:g} | {pct(r['acc_overall'])} | {pct(r['acc_single'])} "
                     f"| {pct(r['acc_two'])} | {pct(r['acc_counting'])} | {pct(r['acc_colors'])} | {pct(r['acc_position'])} "
                     f"| {pct(r['acc_color_attr'])} | {pct(r['acc_heldout_phrasing'])} ({pct(r['acc_seen_phrasing'])}) "
                     f"| {pct(r['acc_heldout_combination'])} ({pct(r['acc_seen_combination'])}) | {r['fid']:.2f} "
                     f"| {r['img_per_s']:.1f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def markdown_tightness_table(results: dict) -> str:
    """The bounds of one multi-T model against T and K."""
    lines = ["| data | model | T | K | ELBO bits/dim | IW bits/dim | ± s.e. | n | s per 1000 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['data']} | {r['model']} | {r['steps']} | {r['trajectories']} | {r['elbo_bpd']:.3f} | "
                     f"{r['iw_bpd']:.3f} | {r['se']:.3f} | {r['n']} | {r['seconds_per_1000']:.0f} |")
    return "\n".join(lines) + "\n"


def markdown_coupling_table(results: dict) -> str:
    """The transporter's coupling gap per level of each grid, and its sum over each grid's noisy levels."""
    lines = ["| T | level | t | coupling gap, nats/dim | ± s.e. | n |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        se = "–" if r["se"] is None else f"{r['se']:.4f}"
        lines.append(f"| {r['steps']} | {r['level']} | {r['t']:.3f} | {r['gap_nats']:.4f} | {se} | {r['n']} |")
    lines += ["", "| T | noisy levels | summed gap, nats/dim | bits/dim |", "|---|---|---|---|"]
    for T, v in results["config"]["sum_over_noisy_levels"].items():
        lines.append(f"| {T} | {v['levels']} | {v['noisy_levels_nats']:.4f} | {v['noisy_levels_bits']:.4f} |")
    return "\n".join(lines) + "\n"


def markdown_step_cost_table(results: dict) -> str:
    """Seconds per training step of NTM and FM on the same backbone, and their ratio."""
    lines = ["| preset | transform | threads | NTM s/step | FM s/step | NTM / FM | steps timed |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['preset']} | {r['transform']} | {r['threads']} | {r['ntm_seconds_per_step']:.3f} "
                     f"| {r['fm_seconds_per_step']:.3f} | {r['ratio']:.2f}× | {r['steps_timed']} |")
    return "\n".join(lines) + "\n"


def is_generated_table(md: Path) -> bool:
    """Is the file ``md`` a table that ``table_for`` wrote (so a re-run may replace it)?"""
    return md.is_file() and md.read_text().startswith(TABLE_PREFIXES)


def table_for(results: dict, details: bool = True) -> str:
    """The table of a results JSON, chosen by what its rows hold (``details`` False: an image
    bench's main table only, without the per-step splits)."""
    rows = results.get("rows", [])
    if rows and "iw_bpd" in rows[0] and "trajectories" in rows[0]:
        return markdown_tightness_table(results)
    if rows and "ntm_seconds_per_step" in rows[0]:
        return markdown_step_cost_table(results)
    if rows and "gap_nats" in rows[0]:
        return markdown_coupling_table(results)
    if rows and "acc_overall" in rows[0]:
        return markdown_text_table(results)
    if rows and "auroc" in rows[0]:
        return markdown_ood_table(results)
    if rows and "ece" in rows[0]:
        return markdown_bayes_table(results)
    if rows and "variant" in rows[0] and "final_nll" in rows[0]:
        return markdown_objective_ablation_table(results)
    if rows and "variant" in rows[0]:
        return markdown_ablation_table(results)
    if rows and "fid" in rows[0] and "guidance" in rows[0]:
        return markdown_guidance_table(results)
    if rows and "fid" in rows[0]:
        return markdown_image_table(results, details)
    return markdown_table(results)
