"""Datasets from what users have (CSV, class folders, file lists, datafiles) into the datafile every command reads."""

import csv
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tympan.data import DatafileError, import_dataset, load_dataset, read_datafile
from tympan.labels import read_label_csv


@pytest.fixture(scope="module")
def clips(data_dir) -> list[Path]:
    return sorted((data_dir / "esc10" / "audio").glob("1-*.flac"))[:6]


def test_the_shared_csvs_import_with_their_conventions(data_dir, tmp_path):
    esc = load_dataset(data_dir / "esc10" / "esc10.csv")
    assert len(esc.manifest) == 320 and len(esc.labels) == 10  # fold 5 is not here: its rows are left out
    assert {r.fold for r in esc.manifest} == {1, 2, 3, 4}
    assert esc.labels.names[0] == "dog" and esc.manifest[0].labels[0] in esc.labels.mids
    fsdd = load_dataset(data_dir / "fsdd" / "fsdd.csv")
    assert len(fsdd.manifest) == 2700 and {r.split for r in fsdd.manifest} == {"train", "validation"}
    paths, _ = import_dataset(data_dir / "esc10" / "esc10.csv", tmp_path)
    assert paths.datafile == tmp_path / "esc10.json" and len(read_datafile(paths.datafile)) == 320
    assert read_label_csv(paths.labels) == esc.labels
    again = load_dataset(paths.datafile)  # a written datafile reads back with its label CSV
    assert again.labels == esc.labels and [r.wav for r in again.manifest] == [r.wav for r in esc.manifest]


def test_a_generic_csv_finds_its_audio_folder_and_reports_missing_rows(clips, tmp_path):
    (tmp_path / "audio").mkdir()
    for clip in clips[:3]:
        shutil.copy(clip, tmp_path / "audio" / clip.name)
    table = tmp_path / "meta.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["File", "Label", "fold", "note"])
        writer.writerow([clips[0].name, "dog,bark", 1, 'said "woof", twice'])
        writer.writerow([clips[1].name, "rain", 2, ""])
        writer.writerow([clips[2].name, "rain", 2, ""])
        writer.writerow(["absent.flac", "rain", 3, ""])
    dataset = load_dataset(table)
    assert [Path(r.wav).name for r in dataset.manifest] == [c.name for c in clips[:3]]
    assert dataset.manifest[0].labels == ("dog", "bark") and dataset.manifest[0].fold == 1
    assert dataset.manifest[0].extra == {"note": 'said "woof", twice'}
    assert dataset.labels.names == ("bark", "dog", "rain")
    assert len(dataset.skipped) == 1 and "meta.csv:5: absent.flac" in dataset.skipped[0]


def test_class_folders_lists_and_single_files(clips, tmp_path):
    for name, group in (("dog", clips[:2]), ("rain", clips[2:5])):
        (tmp_path / "tree" / name / "sub").mkdir(parents=True)
        for clip in group:
            shutil.copy(clip, tmp_path / "tree" / name / "sub" / clip.name)
    tree = load_dataset(tmp_path / "tree")
    assert tree.labels.names == ("dog", "rain") and len(tree.manifest) == 5
    assert sorted(r.labels[0] for r in tree.manifest) == ["dog", "dog", "rain", "rain", "rain"]
    listing = tmp_path / "files.txt"
    listing.write_text(f"# clips\n{clips[0]}\nnot-there.wav\n\n{clips[1]}\n")
    listed = load_dataset(listing)
    assert listed.labels is None and len(listed.manifest) == 2 and "files.txt:3" in listed.skipped[0]
    assert len(load_dataset(clips[0]).manifest) == 1


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nothing-here", "no such file or folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no audio files"),
    (lambda d: (d / "x.csv").write_text("a,b\n1,2\n") and d / "x.csv", "no file column"),
    (lambda d: (d / "y.csv").write_text("file\nnone.wav\n") and d / "y.csv", "none of its 1 rows"),
    (lambda d: (d / "z.bin").write_bytes(b"\0") and d / "z.bin", "not a dataset"),
])
def test_unusable_sources_are_one_line_naming_them(tmp_path, make, message):
    with pytest.raises(DatafileError, match=message) as err:
        load_dataset(make(tmp_path))
    assert "\n" not in str(err.value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file_column=st.sampled_from(["filename", "path", "WAV", "file"]),
    extra=st.lists(st.text(alphabet="abcxyz_", min_size=1, max_size=6), max_size=3, unique=True),
    labels=st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00,"), min_size=1,
                            max_size=8).map(str.strip).filter(bool), min_size=3, max_size=3),
)
def test_any_csv_with_a_file_column_keeps_every_existing_row(clips, tmp_path, file_column, extra, labels):
    """Property: column names, order, extra columns and label text (quotes, unicode) do not change which rows load."""
    extra = [c for c in extra if c.lower() not in {"filename", "path", "wav", "file", "label", "fold", "split"}]
    table = tmp_path / "prop.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*extra, "label", file_column])
        for clip, label in zip(clips[:3], labels):
            writer.writerow([*("v" for _ in extra), label, str(clip)])
    dataset = load_dataset(table)
    assert [r.wav for r in dataset.manifest] == [str(c.resolve()) for c in clips[:3]]
    assert [r.labels for r in dataset.manifest] == [(label,) for label in labels]
