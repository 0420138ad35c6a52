"""The small conv-BN-ReLU nets of Raghu et al. 2019 (Transfusion, RZ19).

Each block is conv(k x k, stride 1, with bias) -> BatchNorm -> ReLU -> 3x3
max-pool stride 2; then global average pooling and a linear head.

Layouts and RZ19 Table 1's parameter counts (conv weights + conv biases, one
input channel, no head, no batch norm; the paper's counting convention):

=============  ======  =========================  ===========  ===========
name           kernel  channels                   ours         RZ19 Table 1
=============  ======  =========================  ===========  ===========
CBR-LargeT     7x7     32, 64, 128, 256, 512      8,532,480    8,532,480
CBR-LargeW     7x7     64, 128, 256, 512          8,433,664    8,432,128
CBR-Small      7x7     32, 64, 128, 256           2,109,440    2,108,672
CBR-Tiny       5x5     32, 64, 128, 256           1,076,480    1,076,480
=============  ======  =========================  ===========  ===========

**The Tiny discrepancy.** RZ19's text gives CBR-Tiny channels 64, 128, 256,
512; its Table 1 gives 1,076,480 parameters, which is exactly 5x5 convs with
channels 32, 64, 128, 256 on one channel with biases. The text's layout would
have 4.3 M parameters, more than CBR-Small, contradicting the name and the
table's ordering; we follow the table (32-256). LargeW and Small match neither
with nor without biases (off by 1,536 and 768); we follow the text's layout.
``tests/test_backbones.py`` checks every number in this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CBRLayout:
    kernel: int
    channels: tuple[int, ...]
    #: RZ19 Table 1 (conv weights + biases, one input channel)
    paper_params: int


CBR_LAYOUTS: dict[str, CBRLayout] = {
    "cbr-large-t": CBRLayout(7, (32, 64, 128, 256, 512), 8_532_480),
    "cbr-large-w": CBRLayout(7, (64, 128, 256, 512), 8_432_128),
    "cbr-small": CBRLayout(7, (32, 64, 128, 256), 2_108_672),
    "cbr-tiny": CBRLayout(5, (32, 64, 128, 256), 1_076_480),
}


def paper_convention_count(layout: CBRLayout, in_chans: int = 1) -> int:
    """Conv weights + conv biases of ``layout`` on ``in_chans`` inputs (RZ19's counting)."""
    chans = (in_chans, *layout.channels)
    return sum(a * b * layout.kernel**2 + b for a, b in zip(chans, chans[1:]))
