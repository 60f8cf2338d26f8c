"""`visiontune report RUN`: one self-contained HTML page (plots and images embedded, no network)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .evaluation import evaluate_run
from .images import decode_rgb
from .runfolder import RunFolder
from .shards import sample_path


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _thumbnail(path: str, size: int = 180) -> str:
    image = decode_rgb(sample_path(path), short_side=size)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    buffer = io.BytesIO()
    image.crop((left, top, left + size, top + size)).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _curves(rows: list[dict], best_epoch: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, title in ((axes[0], "loss", "loss (mean per-sample cross-entropy)"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [float(r[f"train_{metric}"]) for r in rows], "o-", label="train", color="#4C72B0")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], "s-", label="val", color="#DD8452")
        ax.axvline(best_epoch, color="#55A868", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    url = _png(fig)
    plt.close(fig)
    return url


def confusion_figure(matrix: list[list[int]], classes: list[str]):
    """A matplotlib figure of the confusion matrix (rows true, columns predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.2 * k + 1.8))
    ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > top / 2 else "black", fontsize=12)
    ax.set_xticks(range(k), classes, rotation=45 if k > 4 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (val)")
    fig.tight_layout()
    return fig


def mistakes_figure(items: list[dict], columns: int = 4):
    """A grid of the given val mistakes: the image, its true and predicted class and the probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        ax.imshow(decode_rgb(sample_path(item["path"]), short_side=160))
        ax.set_title(f"true {item['true']}\npredicted {item['predicted']} ({item['probability']:.2f})", fontsize=9)
    if not items:
        axes.flat[0].text(0.5, 0.5, "no mistakes on the val split", ha="center", va="center")
    fig.tight_layout()
    return fig


def _confusion(matrix: list[list[int]], classes: list[str]) -> str:
    import matplotlib.pyplot as plt

    fig = confusion_figure(matrix, classes)
    url = _png(fig)
    plt.close(fig)
    return url


def _heatmaps(run: Path, items: list[dict]) -> dict[str, str]:
    """Grad-CAM overlay of the predicted class for each item, as data URLs (empty if none can be made)."""
    if not items:
        return {}
    from .errors import UsageError
    from .explain import Explainer, png_data_url

    try:
        explainer = Explainer.from_run(run, device="cpu")
    except UsageError:  # a backbone without a spatial feature map: the page shows the images only
        return {}
    return {item["path"]: png_data_url(explainer.explain(sample_path(item["path"])).overlay()) for item in items}


def _grid(items: list[dict], empty: str, heatmaps: dict[str, str] | None = None) -> str:
    if not items:
        return f"<p class='muted'>{html.escape(empty)}</p>"
    heatmaps = heatmaps or {}
    cells = []
    for item in items:
        heat = heatmaps.get(item["path"])
        cells.append(
            f"<figure class='{'wrong' if item['true'] != item['predicted'] else 'right'}{' pair' if heat else ''}'>"
            f"<img src='{_thumbnail(item['path'])}' alt='{html.escape(Path(item['path']).name)}'>"
            + (f"<img class='heatmap' src='{heat}' alt='heatmap of {html.escape(item['predicted'])}'>" if heat else "")
            + f"<figcaption>true <b>{html.escape(item['true'])}</b><br>predicted <b>{html.escape(item['predicted'])}</b>"
            f" ({item['probability']:.2f})<br><span class='muted'>{html.escape(Path(item['path']).name)}</span>"
            f"</figcaption></figure>")
    return "<div class='grid'>" + "".join(cells) + "</div>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.3rem .8rem;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}.muted{color:#777;font-size:.85em}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#f6f8fa;border-radius:8px;padding:.8rem 1.2rem}
.card b{font-size:1.4em;display:block}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
figure{margin:0;background:#fafafa;border-radius:6px;overflow:hidden;border:2px solid #ddd;font-size:.85em}
figure.wrong{border-color:#d9534f}figure.right{border-color:#5cb85c}figure img{width:100%;display:block}
figcaption{padding:.4rem .5rem;line-height:1.35}img.plot{max-width:100%}
figure.pair{grid-column:span 2}figure.pair img{width:50%;display:inline-block;vertical-align:top}
"""


def _summary(result: dict, meta: dict, rows: list[dict]) -> str:
    lo, hi = result["accuracy_ci"]
    n = result["n"]
    best = f"<div class='card'>best epoch<b>{meta.get('best_epoch', '?')}</b><span class='muted'>of {len(rows)}</span></div>"
    if result.get("task") == "multi-label":
        return (f"<div class='cards'><div class='card'>val mAP<b>{result['mAP']:.4f}</b><span class='muted'>mean "
                f"average precision over classes</span></div><div class='card'>exact match<b>{result['accuracy']:.4f}"
                f"</b><span class='muted'>95% CI {lo:.3f}-{hi:.3f}; every label right on {result['correct']}/{n} "
                f"images</span></div><div class='card'>val loss<b>{result['loss']:.4f}</b><span class='muted'>mean "
                f"per-class binary cross-entropy</span></div>{best}</div>")
    return (f"<div class='cards'><div class='card'>val accuracy<b>{result['accuracy']:.4f}</b><span class='muted'>"
            f"95% CI {lo:.3f}-{hi:.3f}; {result['correct']}/{n} images, one image = {100 / n:.2f} points</span></div>"
            f"<div class='card'>val loss<b>{result['loss']:.4f}</b><span class='muted'>mean per-sample cross-entropy"
            f"</span></div>{best}</div>")


def _per_class(result: dict, classes: list[str]) -> str:
    if result.get("task") == "multi-label":
        def ap(r: dict) -> str:
            return "-" if r["ap"] is None else f"{r['ap']:.4f}"  # no positive in val: undefined

        rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{r['precision']:.4f}</td><td>{r['recall']:.4f}</td>"
                       f"<td>{r['f1']:.4f}</td><td>{ap(r)}</td><td>{r['threshold']:.3f}</td><td>{r['support']}</td></tr>"
                       for c, r in result["per_class"].items())
        return ("<h2>Per class (val, at each class's threshold chosen on val)</h2><table><tr><th>class</th>"
                "<th>precision</th><th>recall</th><th>F1</th><th>AP</th><th>threshold</th><th>support</th></tr>"
                f"{rows}</table>")
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{r['precision']:.4f}</td><td>{r['recall']:.4f}</td>"
                   f"<td>{r['f1']:.4f}</td><td>{r['support']}</td></tr>" for c, r in result["per_class"].items())
    return ("<h2>Per class (val)</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>support</th></tr>{rows}</table>"
            f"<img class='plot' src='{_confusion(result['confusion_matrix'], classes)}' alt='confusion matrix'>")


def write_report(run: str | Path, max_images: int = 16) -> Path:
    folder = RunFolder(run)
    run = folder.path
    meta = folder.read_model_json()
    config = folder.read_config()
    rows = folder.read_metrics()
    result = evaluate_run(run, keep_items=True)
    classes = result["classes"]
    mistakes = sorted((i for i in result["items"] if i["true"] != i["predicted"]), key=lambda i: -i["probability"])
    correct = sorted((i for i in result["items"] if i["true"] == i["predicted"]), key=lambda i: -i["probability"])
    counts = config["data"]["counts"]
    settings = config["config"]
    shown = ["mode", "model", "epochs", "batch_size", "lr", "optimizer", "schedule", "bn", "head_init",
             "train_size", "label_smoothing", "seed"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>visiontune report: {html.escape(run.name)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(run.name)}</h1>
<p class="muted">{html.escape(meta['backbone'])} ({html.escape(meta['architecture'])}), weights {html.escape(meta['weights_source'])}; data {html.escape(config['data']['root'])} ({html.escape(config['data']['layout'])})</p>
{_summary(result, meta, rows)}
<h2>Data</h2>
<table><tr><th>split</th>{''.join(f'<th>{html.escape(c)}</th>' for c in classes)}<th>total</th></tr>
{''.join(f"<tr><td>{s}</td>{''.join(f'<td>{counts[s].get(c, 0)}</td>' for c in classes)}<td>{sum(counts[s].values())}</td></tr>" for s in counts)}
</table>
<h2>Settings</h2>
<table>{''.join(f'<tr><td>{k}</td><td>{html.escape(str(settings.get(k)))}</td></tr>' for k in shown if k in settings)}</table>
<h2>Training curves</h2><img class="plot" src="{_curves(rows, int(meta.get('best_epoch', 1)))}" alt="training curves">
{_per_class(result, classes)}
<h2>Mistakes ({len(mistakes)}), most confident first</h2>
<p class="muted">Beside each mistake, the Grad-CAM heatmap of the predicted class: where the model found its evidence (red = most).</p>
{_grid(mistakes[:max_images], "No mistakes on the val split.", _heatmaps(run, mistakes[:max_images]))}
<h2>Correct predictions (most confident {min(max_images, len(correct))} of {len(correct)})</h2>
{_grid(correct[:max_images], "No correct predictions.")}
<p class="muted">Generated by visiontune from {html.escape(str(run))}. Self-contained: no external resources.</p>
</body></html>"""
    out = folder.report_file
    out.write_text(page)
    return out
