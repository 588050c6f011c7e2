"""Side-by-side comparison of model outputs, as a self-contained HTML page (images inlined) and Markdown.

    vlmalign compare --model sft=out/sft --model grpo=out/grpo --dataset data/test --n 16 --out report.html

The same renderer writes the demo's report: a results table, training-curve plots and the comparison of outputs.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.formats import normalize_row
from .evaluate import evaluate


@dataclass
class Comparison:
    """For each of n held-out rows: the image(s), the question, the gold answer, and every model's answer."""

    questions: list[str]
    images: list[list]                            # PIL images per row
    solutions: list[str | None]
    answers: dict[str, list[str]] = field(default_factory=dict)      # model name -> answer per row
    correct: dict[str, list[bool]] = field(default_factory=dict)     # model name -> right/wrong per row

    def accuracy(self) -> dict[str, float]:
        return {name: sum(c) / max(1, len(c)) for name, c in self.correct.items()}

    def to_dict(self) -> dict:
        return {"num_rows": len(self.questions), "accuracy": self.accuracy(),
                "rows": [{"question": q, "solution": s, **{n: {"answer": self.answers[n][i], "correct": self.correct[n][i]}
                                                          for n in self.answers}}
                         for i, (q, s) in enumerate(zip(self.questions, self.solutions))]}


def _question(prompt: list[dict]) -> str:
    return " ".join(b.get("text") or "" for m in prompt if m["role"] == "user" for b in m["content"]
                    if b.get("type") == "text").strip()


def compare_models(models: dict[str, tuple], dataset, n: int = 16, *, max_new_tokens: int = 32) -> Comparison:
    """Greedy answers of every (model, processor) on the first `n` rows of `dataset`."""
    subset = dataset.select(range(min(n, len(dataset)))) if hasattr(dataset, "select") else dataset[:n]
    rows = [normalize_row(subset[i], "prompt", i) for i in range(len(subset))]
    comparison = Comparison(questions=[_question(r["prompt"]) for r in rows], images=[r["images"] for r in rows],
                            solutions=[r.get("solution") for r in rows])
    for name, (model, processor) in models.items():
        result = evaluate(model, processor, subset, max_new_tokens=max_new_tokens)
        comparison.answers[name] = [c[0] for c in result.completions]
        comparison.correct[name] = [c[0] for c in result.correct]
    return comparison


# ------------------------------------------------------------------------------------------------------ rendering


def image_data_uri(image, size: int = 96) -> str:
    """A PNG data URI (the page needs no external request), scaled up with nearest-neighbour for tiny images."""
    if image.width < size:
        scale = max(1, size // image.width)
        image = image.resize((image.width * scale, image.height * scale), resample=0)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.ok{background:#e6f6e6}.bad{background:#fbe7e7}code{font-size:90%}img.plot{max-width:640px;display:block}"""


def render_html(comparison: Comparison | None, *, title: str = "vlmalign report", table: list[dict] | None = None,
                plots: dict[str, bytes] | None = None, notes: str = "") -> str:
    """One self-contained page: optional results table, optional PNG plots (inlined), the comparison of outputs."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"]
    if notes:
        parts.append(f"<p>{e(notes)}</p>")
    if table:
        columns = list(table[0])
        parts.append("<h2>Results</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>")
        for row in table:
            parts.append("<tr>" + "".join(f"<td>{e(_fmt(row[c]))}</td>" for c in columns) + "</tr>")
        parts.append("</table>")
    for name, png in (plots or {}).items():
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        parts.append(f"<h2>{e(name)}</h2><img class='plot' alt='{e(name)}' src='{uri}'>")
    if comparison is not None:
        names = list(comparison.answers)
        parts.append("<h2>Outputs side by side</h2><table><tr><th>#</th><th>image</th><th>question</th>"
                     "<th>correct answer</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for i, question in enumerate(comparison.questions):
            imgs = "".join(f"<img alt='row {i} image {k}' src='{image_data_uri(im)}'>"
                           for k, im in enumerate(comparison.images[i]))
            cells = "".join(
                f"<td class='{'ok' if comparison.correct[n][i] else 'bad'}'>{'✔' if comparison.correct[n][i] else '✘'} "
                f"<code>{e(comparison.answers[n][i])}</code></td>" for n in names)
            parts.append(f"<tr><td>{i}</td><td>{imgs}</td><td>{e(question)}</td>"
                         f"<td>{e(str(comparison.solutions[i]))}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(comparison: Comparison | None, *, title: str = "vlmalign report", table: list[dict] | None = None,
                    plot_files: list[str] = (), image_dir: str | None = None, notes: str = "") -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    if table:
        columns = list(table[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in table]
        lines.append("")
    for f in plot_files:
        lines += [f"![{f}]({f})", ""]
    if comparison is not None:
        names = list(comparison.answers)
        lines += ["## Outputs side by side", "", "| # | image | question | correct | " + " | ".join(names) + " |",
                  "|" + "---|" * (4 + len(names))]
        for i, question in enumerate(comparison.questions):
            image = f"![row {i}]({image_dir}/row_{i}.png)" if image_dir else ""
            cells = " | ".join(f"{'✔' if comparison.correct[n][i] else '✘'} `{comparison.answers[n][i]}`" for n in names)
            lines.append(f"| {i} | {image} | {question} | {comparison.solutions[i]} | {cells} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_comparison(comparison: Comparison, out: str | Path, **render_kwargs) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(comparison, **render_kwargs))
    return out


def main(argv: list[str] | None = None) -> None:
    from ..data.io import load_dataset_any
    from ..models.loading import load_model, load_processor

    p = argparse.ArgumentParser(prog="vlmalign compare", description="Every model's answers side by side.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="report.html")
    p.add_argument("--json", default=None, help="also write the answers and accuracies as JSON")
    a = p.parse_args(argv)
    models = {}
    for spec in a.model:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model expects NAME=DIR, got {spec!r}")
        models[name] = (load_model(path), load_processor(path))
    comparison = compare_models(models, load_dataset_any(a.dataset, a.split), a.n, max_new_tokens=a.max_new_tokens)
    write_comparison(comparison, a.out, title="vlmalign compare")
    summary = json.dumps(comparison.to_dict(), indent=2)
    if a.json:
        Path(a.json).write_text(summary + "\n")
    print(json.dumps({"out": a.out, "accuracy": comparison.accuracy()}, indent=2))
