"""A job whose export format cannot express its run is refused at submission (422), before queueing."""
from __future__ import annotations

import pytest

from tests.service.test_api import submit


@pytest.mark.parametrize("changes, message", [
    ({"export": ["onnx-int8"], "w_bits": 4, "a_bits": 4, "method": "erq+"}, "needs a_bits 8"),
    ({"export": ["onnx-int8"], "w_bits": 8, "a_bits": 8, "method": "erq"}, "--method erq+"),
    ({"export": ["onnx-w4"], "w_bits": 8, "a_bits": 8, "method": "erq+"}, "needs w_bits 4 or fewer"),
])
def test_an_export_the_run_cannot_have_is_refused_with_a_message(client, alice, changes, message):
    answer = submit(client, alice, **changes)
    assert answer.status_code == 422
    assert message in str(answer.json()["detail"])
    assert client.get("/v1/jobs", headers=alice).json()["jobs"] == []


def test_a_job_may_ask_for_both_integer_formats_when_its_run_fits_them(client, alice):
    answer = submit(client, alice, export=["onnx-int8", "onnx-w4"], w_bits=4, a_bits=8, method="erq+")
    assert answer.status_code in (201, 202), answer.text
    assert answer.json()["params"]["export"] == ["onnx-int8", "onnx-w4"]


def test_a_job_chooses_how_onnx_int8_holds_8_bit_weights(client, alice):
    refused = submit(client, alice, export=["onnx-int8"], w_bits=8, a_bits=8, method="erq+", int8_weights="fast")
    assert refused.status_code == 422
    assert "int8_weights" in refused.text and "exact" in refused.text and "signed" in refused.text
    default = submit(client, alice, export=["onnx-int8"], w_bits=8, a_bits=8, method="erq+")
    assert default.status_code in (201, 202), default.text
    assert default.json()["params"]["int8_weights"] == "signed"
    exact = submit(client, alice, export=["onnx-int8"], w_bits=8, a_bits=8, method="erq+", int8_weights="exact")
    assert exact.status_code in (201, 202), exact.text
    assert exact.json()["params"]["int8_weights"] == "exact"
