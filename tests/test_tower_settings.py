import pytest

from littune.model.settings import VALID_SETTINGS, parse_setting


@pytest.mark.parametrize("s,img,txt", [("Lu", (True, True), (False, False)), ("LU", (True, True), (True, False)),
                                       ("Uu", (True, False), (False, False)), ("uu", (False, False), (False, False)),
                                       ("UL", (True, False), (True, True))])
def test_parse(s, img, txt):
    t = parse_setting(s)
    assert (t.image.pretrained, t.image.locked) == img
    assert (t.text.pretrained, t.text.locked) == txt
    assert t.name == s


@pytest.mark.parametrize("bad", ["", "L", "lu", "LUu", "Xu", None])
def test_invalid_setting_lists_valid_ones(bad):
    with pytest.raises(ValueError) as e:
        parse_setting(bad)
    msg = str(e.value)
    for s in ("Lu", "LU", "Uu", "UU", "uu", "UL"):
        assert s in msg
    assert len(VALID_SETTINGS) == 9
