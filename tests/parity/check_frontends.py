"""Frontend parity: tympan.features against the torchaudio-made tensors stored in the model fixtures.

Target lengths, chunk lengths and hop sizes are read off the stored tensors' shapes; tolerances follow each
fixture's meta.json (log-mel in dB: atol 1e-3).
"""

from __future__ import annotations

from tests.parity import Fixture, checks_for
from tympan.features import ASTFbank, DashengMel, SSAMLogMel, kaldi_fbank, pad_or_crop

DB_ATOL = 1e-3  # meta.json notes of dasheng-base / sat-tiny-2s: "mel_db atol 1e-3"


@checks_for("ast-base384-f10t10")
def check_ast_fbank(fx: Fixture) -> None:
    waveform = fx["waveform"]
    if fx.has("fbank_kaldi"):  # the exact torchaudio call recorded in meta.json
        raw = kaldi_fbank(waveform - waveform.mean(-1, keepdim=True), 16000, htk_compat=True, use_energy=False,
                          window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        fx.compare("fbank_kaldi", raw, atol=2e-3)
    for name in ("fbank", "input_short", "input"):
        if fx.has(name):
            frontend = ASTFbank(16000, target_length=fx[name].shape[-2])
            fx.compare(name, frontend(waveform), atol=2e-4)


@checks_for("audiotransformer-tiny", "dasheng-base")
def check_dasheng_mel(fx: Fixture) -> None:
    frontend = DashengMel()
    fx.compare("mel_db", frontend(fx["input"]), atol=DB_ATOL)
    if fx.has("long_input", "mel_db_long"):
        fx.compare("mel_db_long", frontend(fx["long_input"]), atol=DB_ATOL)


@checks_for("sat-tiny-2s")
def check_sat_mel_first_chunk(fx: Fixture) -> None:
    if not fx.has("mel_db_chunk0"):
        return
    frontend = DashengMel()
    chunk_samples = (fx["mel_db_chunk0"].shape[-1] - 1) * frontend.hop_length  # T = N // hop + 1
    fx.compare("mel_db_chunk0", frontend(fx["input"][..., :chunk_samples]), atol=DB_ATOL)


@checks_for("ssam-tiny")
def check_ssam_logmel(fx: Fixture) -> None:
    logmel = SSAMLogMel()(fx["waveform"])
    fx.compare("logmel", logmel, atol=1e-4, rtol=1e-4)
    if fx.has("input"):  # the chunk meta.json names (default 0) of the log-mel zero-padded to whole chunks
        chunk, index = fx["input"].shape[-2], fx.chunk_index("input")
        frames = logmel.shape[-2]
        padded = pad_or_crop(logmel, -(-frames // chunk) * chunk)
        fx.compare("input", padded[..., index * chunk:(index + 1) * chunk, :], atol=1e-4, rtol=1e-4)
