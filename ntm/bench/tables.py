"""Markdown tables of the benchmark results (``results/*.md`` and the tables in README and docs/),
made from the results JSON alone so that every table can be regenerated (``ntm report``)."""
from __future__ import annotations

import math

# the first characters of each table kind (a re-run may replace a file that starts so)
TABLE_PREFIXES = ("| data | model |", "| model | steps |", "Finetune ablation on ")


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


def markdown_image_table(results: dict) -> str:
    """The image bench rows as a markdown table."""
    lines = ["| model | steps | decode / solver | NFE | FID | KID ×1e3 | precision | recall | class acc. | bits/dim | img/s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        bpd = "n/a" if r["bpd"] is None or not math.isfinite(r["bpd"]) else f"{r['bpd']:.3f}"
        model = r["model"] + (f" (λ={r['aux_weight']:g}{', frozen backbone' if r.get('backbone') == 'frozen' else ''})"
                              if r.get("aux_weight") is not None else "")
        lines.append(f"| {model} | {r['steps']} | {r['decode'] or r['solver']} | {r['nfe']} | {r['fid']:.3f} | "
                     f"{1e3 * r['kid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {100 * r['class_acc']:.1f}% | "
                     f"{bpd} | {r['img_per_s']:.1f} | {r['train_seconds']:.0f} |")
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


def table_for(results: dict) -> str:
    """The table of a results JSON, chosen by what its rows hold."""
    rows = results.get("rows", [])
    if rows and "variant" in rows[0]:
        return markdown_ablation_table(results)
    if rows and "fid" in rows[0]:
        return markdown_image_table(results)
    return markdown_table(results)
