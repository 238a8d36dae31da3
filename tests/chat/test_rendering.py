from chat.rendering import markdown_render


def test_model_output_cannot_inject_html_or_script() -> None:
    html = markdown_render('<script>alert(1)</script> and <img src=x onerror="alert(2)">')
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


def test_javascript_links_are_removed_and_markdown_renders() -> None:
    html = markdown_render("**bold** [x](javascript:alert(1)) `code`")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert 'href="javascript' not in html and "<a " not in html
