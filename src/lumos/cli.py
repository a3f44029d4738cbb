"""The `lumos` command line: demo, methods, explain."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lumos.core.errors import LumosError

app = typer.Typer(
    help="lumos — explain and visualize neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(exc: LumosError) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


DEVICE_HELP = "Where the model runs: cpu, cuda, cuda:1, mps (default: the model's own)."


def _on_device(name: str | None, net, *tensors):
    """`net` and `tensors` moved to the device called `name` (unchanged for None), or an
    `InputError` saying why that device cannot be used."""
    if name is None:
        return (net, *tensors)
    import torch

    from lumos.core.errors import InputError

    def refuse(why: object) -> InputError:
        return InputError(
            f"--device {name!r} cannot be used here: {why}. Use --device cpu, or a device this "
            "torch build has (cuda, cuda:1, mps)."
        )

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise refuse(exc) from exc
    if device.type == "meta":
        raise refuse("meta tensors hold no values")
    mps = getattr(torch.backends, "mps", None)
    if (device.type == "cuda" and not torch.cuda.is_available()) or (
        device.type == "mps" and not (mps is not None and mps.is_available())
    ):
        raise refuse(f"this torch build sees no {device.type} device")
    try:
        torch.empty(1, device=device)
        moved = [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]
        net = net.to(device) if hasattr(net, "to") else net
    except Exception as exc:  # unknown backends fail in many ways (assertions, imports)
        raise refuse(exc) from exc
    return (net, *moved)


@app.command()
def demo(
    out: Path = typer.Option(Path("lumos-report"), "--out", help="Folder for the HTML report."),
    n_images: int = typer.Option(6, "--n-images", min=1, max=32, help="Test images to explain."),
    methods: str = typer.Option(
        "", "--methods", help="Comma-separated method names (default: every applicable one)."
    ),
    seed: int = typer.Option(0, "--seed", help="Which test images (and method seeds)."),
    evaluation: bool = typer.Option(
        True, "--evaluation/--no-evaluation", help="Rank the methods and run the sanity check."
    ),
    tabular: bool = typer.Option(
        True, "--tabular/--no-tabular", help="Add the tabular model's Shapley values."
    ),
) -> None:
    """Explain the `shapes` zoo model with every applicable method, rank them with the trust
    metrics, and write a self-contained HTML report."""
    from lumos.report.demo import run_demo

    only = [m.strip() for m in methods.split(",") if m.strip()] or None
    try:
        with console.status("starting") as status:
            run = run_demo(
                out,
                n_images=n_images,
                methods=only,
                seed=seed,
                evaluation=evaluation,
                tabular=tabular,
                log=lambda m: status.update(m),
            )
    except LumosError as exc:
        _fail(exc)
    for name, reason in run.failures.items():
        console.print(f"[yellow]{name} did not run:[/] {reason}")
    console.print(
        f"explained {n_images} images with {len(run.explanations)} methods in {run.seconds:.1f} s"
    )
    typer.echo(str(run.path.resolve()))


@app.command("methods")
def list_methods(
    family: str = typer.Option(None, "--family", help="Only this family."),
) -> None:
    """List every registered method with its family, requirements and options."""
    import lumos

    table = Table(title="lumos methods")
    for column in ("name", "family", "needs", "options", "summary"):
        table.add_column(column, overflow="fold")
    for row in lumos.methods(family):
        options = ", ".join(f"{k}={v!r}" for k, v in row.options.items())
        table.add_row(row.name, row.family, ",".join(sorted(row.needs)), options, row.summary)
    Console(width=200).print(table)


@app.command()
def explain(
    model: str = typer.Option(
        ..., "--model", help="zoo:NAME, a TorchScript file, or package.module:factory."
    ),
    input: Path = typer.Option(..., "--input", help="An image, .pt, .npy or .safetensors file."),
    method: str = typer.Option("integrated_gradients", "--method", help="A registered method."),
    target: str = typer.Option("predicted", "--target", help="A class index or 'predicted'."),
    out: Path = typer.Option(Path("explanation.png"), "--out", help="Figure to write (PNG)."),
    save: Path = typer.Option(None, "--save", help="Also save the Explanation (.lumos)."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="A method option as key=value (repeatable)."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow loading a pickled full model (runs its code)."
    ),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Explain one input file with one method and write the figure."""
    import lumos
    from lumos.loading import load_input, load_model, parse_value

    try:
        net, info = load_model(model, trust_pickle=trust_pickle)
        shape = info.get("input_shape")
        x = load_input(
            input,
            size=tuple(shape[-2:]) if shape and len(shape) == 3 else None,
            channels=shape[0] if shape and len(shape) == 3 else None,
        )
        options = {}
        for item in option:
            key, sep, value = item.partition("=")
            if not sep:
                raise LumosError(f"--option takes key=value, got {item!r}.")
            options[key.strip()] = parse_value(value.strip())
        chosen = parse_value(target)
        net, x = _on_device(device, net, x)
        exp = lumos.explain(net, x, method=method, target=chosen, **options)
    except LumosError as exc:
        _fail(exc)
    names = getattr(info.get("bundle"), "class_names", None)
    label = int(exp.targets[0]) if exp.targets is not None else None
    title = f"{method} — target {label}" + (
        f" ({names[label]})" if names and label is not None else ""
    )
    fig = exp.figure(title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    if save is not None:
        exp.save(save)
    console.print(f"{exp!r}")
    typer.echo(str(out.resolve()))


@app.command()
def evaluate(
    model: str = typer.Option(
        ..., "--model", help="zoo:NAME, a TorchScript file, or package.module:factory."
    ),
    data: str = typer.Option(
        ..., "--data", help="Inputs: a .pt/.npy/.safetensors tensor file, or zoo:NAME (its tests)."
    ),
    labels: Path = typer.Option(None, "--labels", help="Targets per example (default: predicted)."),
    masks: Path = typer.Option(None, "--masks", help="Ground-truth masks (enables localisation)."),
    methods: str = typer.Option("", "--methods", help="Comma-separated methods (default: all)."),
    metrics: str = typer.Option("", "--metrics", help="Comma-separated metrics (default set)."),
    layer: str = typer.Option(None, "--layer", help="Layer for CAM/layer methods (dotted path)."),
    n: int = typer.Option(16, "--n", min=1, help="Examples to take from a zoo test set."),
    out: Path = typer.Option(Path("lumos-evaluation"), "--out", help="Folder for the report."),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow loading a pickled full model (runs its code)."
    ),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Which explanation method should I trust? Rank methods × metrics on your model and data."""
    from lumos.loading import load_input, load_model
    from lumos.metrics import trust_report
    from lumos.report.page import Page

    try:
        net, info = load_model(model, trust_pickle=trust_pickle)
        target, mask = "predicted", None
        if data.startswith("zoo:"):
            from lumos import zoo

            bundle = zoo.load(data[len("zoo:") :])
            batch = bundle.test_batch(n)
            x, target = batch[0], batch[1]
            mask = batch[2] if len(batch) > 2 else None
            layer = layer or bundle.default_layer
        else:
            x = load_input(Path(data))
        if labels is not None:
            target = load_input(labels).long()
        if masks is not None:
            mask = load_input(masks).bool()
        bundle = info.get("bundle")
        layer = layer or getattr(bundle, "default_layer", None)
        net, x, mask = _on_device(device, net, x, mask)
        with console.status("scoring methods × metrics"):
            result = trust_report(
                net,
                x,
                target,
                masks=mask,
                layer=layer,
                methods=[m.strip() for m in methods.split(",") if m.strip()] or None,
                metrics=[m.strip() for m in metrics.split(",") if m.strip()] or None,
            )
    except LumosError as exc:
        _fail(exc)
    page = Page("Which explanation method should I trust?")
    page.add("Evaluation", result.to_html(full=False))
    path = page.write(out / "index.html")
    rows = result.ranking()
    table = Table(title="ranking per metric (1 = best), best method first")
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        )
    Console(width=200).print(table)
    typer.echo(str(path.resolve()))


def main() -> None:  # pragma: no cover - console entry point
    app()
