import pytest

from factory.framework.layout import safe_id, sample_key


def test_same_job_same_key_and_no_dots():
    fields = dict(reference_id="r1", instruction_id="i1", instruction="a dog", seed=3, generator="profusion",
                  checkpoint="ck", round=0)
    key = sample_key(**fields)
    assert key == sample_key(**fields)
    assert "." not in key and len(key) == 24


@pytest.mark.parametrize("field, value", [("seed", 4), ("alpha", 0.5), ("round", 1), ("checkpoint", "other")])
def test_each_defining_field_changes_the_key(field, value):
    base = dict(reference_id="r1", instruction_id="i1", instruction="a dog", seed=3, generator="g", checkpoint="ck",
                round=0)
    assert sample_key(**base) != sample_key(**{**base, field: value})


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="not a key field"):
        sample_key(reference_id="r", colour="red")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b/c.jpg", "nul\x00byte", "ünïcødé.png", "/abs/path"])
def test_safe_id_never_carries_path_parts(name):
    ident = safe_id(name)
    assert "/" not in ident and ".." not in ident and "\x00" not in ident and ident.isascii()
    assert ident == safe_id(name) and ident != safe_id(name + "x")


def test_portable_ref_keeps_keys_across_working_folders(tmp_path, monkeypatch):
    from factory.framework.layout import portable_ref

    for folder in ("job-a", "job-b"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "job-a")
    first = portable_ref(str(tmp_path / "job-a" / "models" / "g"))
    monkeypatch.chdir(tmp_path / "job-b")
    assert portable_ref(str(tmp_path / "job-b" / "models" / "g")) == first == "models/g"
    assert portable_ref("/elsewhere/models/g") == "/elsewhere/models/g"
    assert portable_ref("s3://bucket/g") == "s3://bucket/g" and portable_ref("org/model") == "org/model"
