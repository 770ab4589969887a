"""The committed gRPC stubs are what grpcio-tools makes of the committed proto (``make proto``)."""
from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

SCALER = Path(__file__).resolve().parents[2] / "scaler"


def test_stubs_match_the_proto(tmp_path: Path):
    (tmp_path / "scaler").mkdir()
    shutil.copy(SCALER / "externalscaler.proto", tmp_path / "scaler")
    rc = protoc.main(["protoc", f"-Iscaler={tmp_path / 'scaler'}", f"--python_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(tmp_path / "scaler" / "externalscaler.proto")])
    assert rc == 0
    for name in ("externalscaler_pb2.py", "externalscaler_pb2_grpc.py"):
        assert (tmp_path / "scaler" / name).read_text() == (SCALER / name).read_text(), f"run `make proto`: {name}"


def test_service_is_keda_s():
    from scaler import externalscaler_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ExternalScaler"]
    assert service.full_name == "externalscaler.ExternalScaler"
    assert set(service.methods_by_name) == {"IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics",
                                            "StreamMetricSpec"}
    assert service.methods_by_name["StreamIsActive"].server_streaming
