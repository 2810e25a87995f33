"""Every rendering of an audit: terminal table, markdown, CSV, JSON, HTML, JUnit, GitHub."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "audit_report",
        "charts",
        "github",
        "html",
        "json_parts",
        "junit",
        "markdown",
        "numbers",
        "record",
        "render",
        "screen",
        "summary",
        "table",
        "terminal",
        "writing",
    ],
    submod_attrs={
        "audit_report": ["AuditReport"],
        "record": ["AuditRecord", "BaselineCheck", "Gated"],
        "render": [
            "Format",
            "render",
            "render_table",
            "render_markdown",
            "render_csv",
            "render_json",
        ],
        "html": ["render_html"],
        "junit": ["render_junit"],
        "github": ["GitHub", "render_annotations", "render_step_summary"],
        "writing": ["write_set", "check_writable"],
    },
)
