"""Generate the Python modules of ``protos/jobs.proto`` with grpcio-tools: ``python -m producer_api.grpc.codegen``.

The modules are committed (an installed fleet needs no compiler); ``tests/unit/test_grpc.py`` regenerates them
into a temporary directory and checks that the committed ones match, so a change to the ``.proto`` without a
regeneration fails the suite.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

#: The repository root: the include path, so that the generated imports read ``producer_api.grpc.protos``.
ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("producer_api/grpc/protos/jobs.proto")
GENERATED = ("jobs_pb2.py", "jobs_pb2.pyi", "jobs_pb2_grpc.py")


def generate(out: Path) -> dict[str, bytes]:
    """Compile the proto into ``out`` (mirroring the repository layout); returns each generated file's bytes."""
    from grpc_tools import protoc  # a development tool: the test extra installs it

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/struct.proto
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return {name: (out / PROTO.parent / name).read_bytes() for name in GENERATED}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in generate(Path(tmp)).items():
            (ROOT / PROTO.parent / name).write_bytes(data)
            print(f"wrote {PROTO.parent / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
