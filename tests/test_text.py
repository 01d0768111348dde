"""shapeprof/text.py: units, one-line errors, slugs, and strings made safe for a terminal."""
import pytest

from shapeprof.text import fmt_bytes, fmt_flops, fmt_intensity, fmt_seconds, one_line, printable, slug


def test_printable_keeps_text_newlines_and_tabs():
    assert printable("layers.3.attn\tx\ny") == "layers.3.attn\tx\ny"
    assert printable("a\x1b[31mred\x1b[0m b") == "ared b"
    assert printable("unterminated \x1b]0;title") == "unterminated "
    assert printable("é ü ‖ µs") == "é ü ‖ µs"        # not control: printed as they are


@pytest.mark.parametrize("value, text", [(0, "0"), (999, "999"), (1500, "1.5 k"), (2.5e12, "2.5 T"), (3e15, "3 P")])
def test_flops_are_written_with_si_prefixes(value, text):
    assert fmt_flops(value, unit=False) == text


def test_units_and_intensities():
    assert (fmt_bytes(512), fmt_bytes(16.1e9), fmt_bytes(2e12)) == ("512 B", "16.1 GB", "2 TB")
    assert (fmt_seconds(2.5), fmt_seconds(7.48e-3), fmt_seconds(3.2e-6), fmt_seconds(5e-9)) == \
        ("2.5 s", "7.48 ms", "3.2 µs", "5 ns")
    # a ridge and a row's intensity with the same significant figures: 9.56, never "10" against a 9.6 row
    assert (fmt_intensity(19.5e12 / 2.039e12), fmt_intensity(float("inf"))) == ("9.56", "inf")


def test_one_line_and_slug():
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert one_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert slug("NVIDIA A100-SXM4-80GB") == "NVIDIA-A100-SXM4-80GB" and slug("///") == "run"
