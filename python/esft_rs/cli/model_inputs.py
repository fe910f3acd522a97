"""What the model-running commands (profile, eval) share: --device, and the inputs checked
before a model loads (torch imported inside)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from esft_rs.errors import EsftValueError, InvalidFileError
from esft_rs.files.inputs import check_file

if TYPE_CHECKING:
    import torch

    from esft_rs.data import TaskData
    from esft_rs.data.tokenizer import Tokenizer
    from esft_rs.distributed import Dist


def chat_template_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--chat-template``, as the training config's ``chat_template`` key."""
    from esft_rs.cli.params import CHAT_TEMPLATE_METAVAR
    from esft_rs.training.config import TrainConfig, option_fields

    text = next(h for name, _, _, h, _ in option_fields() if name == "chat_template")
    return click.option("--chat-template", default=TrainConfig.chat_template, show_default=True,
                        metavar=CHAT_TEMPLATE_METAVAR, help=text)(f)


def parallelism_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--parallelism``: how the model is spread over torchrun's processes (``load``)."""
    return click.option(
        "--parallelism", type=click.Choice(["auto", "fsdp", "ddp", "ep"]), default="auto",
        show_default=True,
        help="Under torchrun: fsdp shards the model over the processes (FSDP2), for models"
        " larger than one device; ep gives each process its share of every MoE layer's"
        " experts and sends tokens to them; ddp gives each process a whole copy; auto: ddp"
        " when the weights fit one device, else ep (else fsdp).")(f)


def load(model: Path, place: Dist, device: torch.device, parallelism: str) -> torch.nn.Module:
    """``sharded_load.load_for_inference``, its note on stderr (main process)."""
    from esft_rs.training.sharded_load import load_for_inference

    net, note = load_for_inference(model, place, device, parallelism)
    if note is not None and place.main:
        click.echo(f"esft-rs: note: {note}", err=True)
    return net


def task_inputs(
    model: Path, data: tuple[Path, ...], device: str, skip_bad: bool, chat_template: str = "auto"
) -> tuple[torch.device, Tokenizer, TaskData]:
    """(device, tokenizer, task data): everything that can be wrong with the inputs
    fails here, before the model loads. Skipped lines are listed on stderr."""
    from esft_rs.data import read_task_data
    from esft_rs.data.tokenizer import load_tokenizer

    if not (model / "config.json").exists():
        raise InvalidFileError(f"{model}: no config.json (not a model directory)")
    check_file(model / "config.json")
    dev = torch_device(device)
    tokenizer = load_tokenizer(model, chat_template)
    task = read_task_data(list(data), skip_bad=skip_bad)
    for line in task.skipped:
        click.echo(f"warning: skipped {line}", err=True)
    return dev, tokenizer, task


def torch_device(name: str) -> torch.device:
    """``--device``: auto picks this rank's GPU (LOCAL_RANK under torchrun) or the CPU."""
    from esft_rs.distributed import device_for

    try:
        return device_for(name)
    except EsftValueError as e:  # click names the option
        raise click.BadParameter(str(e).removeprefix("device "), param_hint="'--device'") from None
