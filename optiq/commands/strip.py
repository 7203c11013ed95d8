"""optiq strip: a multimodal checkpoint -> its text-only model, without quantizing."""

from dataclasses import dataclass, field

from . import run_command, script_entry
from ..io import check_output
from ..source import resolve_model
from ..strip import strip


@dataclass
class StripOptions:
    model: str = field(metadata=dict(args=["model"], help="folder or Hub repo id of a multimodal checkpoint"))
    output: str = field(metadata=dict(args=["-o", "--output"], help="output folder"))
    force: bool = field(default=False, metadata=dict(help="replace an existing output"))


def run(opts: StripOptions):
    check_output(opts.output, opts.force)
    report = strip(resolve_model(opts.model), opts.output, force=opts.force)
    print(
        f"wrote {opts.output}: {report.family} -> {report.text_model_type}, removed "
        f"{report.removed_tensors} tensors ({report.removed_bytes / 2**20:.2f} MiB; "
        f"{', '.join(report.removed_prefixes)}), kept {report.kept_bytes / 2**20:.2f} MiB"
    )
    return report


def main(argv=None, prog="optiq strip") -> int:
    return run_command(StripOptions, run, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
