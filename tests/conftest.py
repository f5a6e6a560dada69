"""Set-up for the whole suite (every tier): ``ast.parse`` guarded against CPython gh-106905 on the
interpreters that have it (see ``tests/ast_guard.py``)."""

import ast_guard

ast_guard.install()
