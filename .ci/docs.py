"""Build the course site in docs/ from the notebooks: one command, offline, byte-for-byte deterministic.

    python .ci/docs.py              # (re)write docs/
    python .ci/docs.py --check      # exit 1 if docs/ is not what the notebooks give (CI runs this)
    python .ci/docs.py --out DIR    # build somewhere else (tests/test_docs_browser.py does)

A page per lesson (outputs kept, prompts dropped, nbdev's show_doc block after every exported name), a landing page
with the lesson map, an API reference for every name in the modules' `__all__`, highlighted source pages with line
anchors, and a search index; formulas are rendered in the browser by a vendored KaTeX. Nothing is fetched from the
network, at build time or when reading. Why this tool and how it works: .ci/site/build-notes.md (docs/build.html)."""
import ast, base64, builtins, configparser, keyword, hashlib, html, io, json, re, shutil, struct, sys, tokenize
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from nbconvert.filters.ansi import ansi2html
from nbconvert.filters.markdown_mistune import markdown2html_mistune
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

sys.path.insert(0, str(Path(__file__).parent))
from nbtools import default_exp, directives, lesson_notebooks, shown_cells

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent/'site'
TIMES = Path(__file__).resolve().parent/'lesson_times.json'
RESERVED = {'index.html', 'api.html', 'build.html'}
PYGMENTS_STYLE = 'default'

def esc(s): return html.escape(str(s), quote=True)

def md(src):
    "Markdown to HTML as Jupyter renders it (mistune; `$...$` math left for KaTeX)."
    return markdown2html_mistune(src)

def text_of(fragment):
    "Plain text of an HTML fragment (for the search index)."
    return re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', ' ', fragment)).replace('¶', '')).strip()

# Python is coloured from Python's own tokenizer (ten times faster than Pygments' regex lexer, and exact), with
# Pygments' class names so its style sheet applies; code the tokenizer rejects (IPython magics) goes to Pygments.
STYLED = set(re.findall(r'^\.highlight \.(\S+) \{', HtmlFormatter(style=PYGMENTS_STYLE).get_style_defs('.highlight'),
                        re.M)) - {'w', 'o'}
BUILTINS = {n for n in dir(builtins) if not n.startswith('_')}
KEYWORD_CLASS = {**{k: 'k' for k in keyword.kwlist}, 'import': 'kn', 'from': 'kn', 'True': 'kc', 'False': 'kc',
                 'None': 'kc', 'and': 'ow', 'or': 'ow', 'not': 'ow', 'in': 'ow', 'is': 'ow'}
STRING_TOKENS = {tokenize.STRING} | {getattr(tokenize, n) for n in ('FSTRING_START', 'FSTRING_MIDDLE', 'FSTRING_END')
                                     if hasattr(tokenize, n)}

def _token_class(tok, prev, importing):
    if tok.type == tokenize.COMMENT: return 'c1'
    if tok.type in STRING_TOKENS: return 's2'
    if tok.type == tokenize.NUMBER: return 'mi'
    if tok.type != tokenize.NAME: return None
    if tok.string in KEYWORD_CLASS: return KEYWORD_CLASS[tok.string]
    if importing: return 'nn'
    if prev == 'def': return 'nf'
    if prev == 'class': return 'nc'
    if prev == '@': return 'nd'
    if tok.string in BUILTINS and prev != '.': return 'nb'
    return None

def _pygments_html(src):
    h = highlight(src, PythonLexer(), HtmlFormatter(nowrap=True))
    return re.sub(r'<span class="([^"]+)">([^<]*)</span>', lambda m: m.group(0) if m.group(1) in STYLED else m.group(2), h)

def code_html(src):
    "Highlighted HTML of Python source (no wrapper)."
    try: toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError): return _pygments_html(src).rstrip('\n')
    starts = [0]
    for line in src.splitlines(keepends=True): starts.append(starts[-1] + len(line))
    def at(rc): return starts[rc[0] - 1] + rc[1] if rc[0] - 1 < len(starts) else len(src)
    out, pos, prev, importing, stmt_start = [], 0, None, None, True
    for tok in toks:
        start, end = at(tok.start), at(tok.end)
        if end <= pos and start < pos: continue
        out.append(html.escape(src[pos:start], quote=False))
        # module names: everything between `from` and `import`, and after a statement's leading `import`
        if tok.type == tokenize.NAME and stmt_start and tok.string in ('from', 'import'): importing = tok.string
        elif tok.type == tokenize.NAME and tok.string == 'import' and importing == 'from': importing = None
        cls = _token_class(tok, prev, importing and tok.type == tokenize.NAME and tok.string not in ('from', 'import', 'as'))
        text = html.escape(src[start:end], quote=False)
        out.append(f'<span class="{cls}">{text}</span>' if cls else text)
        pos = max(pos, end)
        if tok.type == tokenize.NEWLINE: importing = None
        stmt_start = tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) or tok.string in (';', ':') or \
            (tok.type in (tokenize.NL, tokenize.COMMENT) and stmt_start)
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT): prev = tok.string
    out.append(html.escape(src[pos:], quote=False))
    return ''.join(out).rstrip('\n')

# ---------------------------------------------------------------- lessons
@dataclass
class Lesson:
    path: Path
    stem: str
    num: str
    page: str
    title: str
    summary: str
    module: str | None
    cells: list = field(repr=False, default_factory=list)

    @property
    def title_html(self): return inline_md(self.title)
    @property
    def label(self): return f'{self.num} {text_of(self.title_html)}'.strip()

def inline_md(s):
    "Markdown of one line (a title) as inline HTML, without the paragraph."
    return re.sub(r'^<p>(.*)</p>\s*$', r'\1', md(s).strip(), flags=re.S)

def page_of(nb_path):
    "nbdev's page name for a notebook: 05_dmattn.ipynb -> dmattn.html (what _modidx.py links to)."
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb_path.stem.lower()) + '.html'

TITLE = re.compile(r'^#\s+(.+?)\s*$', re.M)
SUMMARY = re.compile(r'^>\s*(.+?)\s*$', re.M)

def read_lesson(nb_path):
    cells = shown_cells(nb_path)
    title, summary = nb_path.stem, ''
    for c, _ in cells:
        if c.cell_type == 'markdown' and (m := TITLE.search(c.source)):
            title = m.group(1)
            if s := SUMMARY.search(c.source[m.end():]): summary = s.group(1)
            break
    num = m.group(1) if (m := re.match(r'^(\d+[a-zA-Z0-9]*)_', nb_path.stem)) else ''
    mod = default_exp(nb_path)
    return Lesson(nb_path, nb_path.stem, num, page_of(nb_path), title, summary,
                  f'small_doge.{mod}' if mod and mod != '__init__' else None, cells)

# ---------------------------------------------------------------- API (from the source, as nbdev's show_doc shows it)
@dataclass
class Doc:
    module: str           # small_doge.attention
    qualname: str         # dynamic_mask_attention, or Class.method
    kind: str             # function, class, method, property, constant
    node: ast.AST = field(repr=False)
    line: int = 0
    path: str = ''        # small_doge/attention.py
    signature: str = ''
    doc: str = ''
    params: list = field(default_factory=list)   # (name, annotation, default, comment)
    lesson: 'Lesson | None' = None
    lesson_anchor: str = ''

    @property
    def name(self): return self.qualname.split('.')[-1]
    @property
    def short_module(self): return self.module.removeprefix('small_doge.')
    @property
    def api_id(self): return f'{self.short_module}.{self.qualname}'
    @property
    def src_page(self): return f'src/{self.short_module}.html'

def _comments(src):
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT: out[tok.start[0]] = tok.string.lstrip('#').strip()
    return out

def _only_comment_lines(src_lines):
    return {i + 1 for i, l in enumerate(src_lines) if l.strip().startswith('#')}

def _args(node, drop_first):
    "[(prefix, arg, default)] in signature order, '/' and '*' markers as (marker, None, None)."
    a, out = node.args, []
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for i, (arg, d) in enumerate(zip(pos, defaults)):
        out.append(('', arg, d))
        if a.posonlyargs and i == len(a.posonlyargs) - 1: out.append(('/', None, None))
    if a.vararg: out.append(('*', a.vararg, None))
    elif a.kwonlyargs: out.append(('*', None, None))
    out += [('', arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg: out.append(('**', a.kwarg, None))
    if drop_first and out and out[0][1] is not None: out = out[1:]
    if out and out[0] == ('/', None, None): out = out[1:]
    return out

def _fmt_arg(prefix, arg, default):
    if arg is None: return prefix
    s = prefix + arg.arg
    if arg.annotation is not None:
        s += ': ' + ast.unparse(arg.annotation)
        if default is not None: s += ' = ' + ast.unparse(default)
    elif default is not None: s += '=' + ast.unparse(default)
    return s

def signature(name, node, drop_first):
    parts = [_fmt_arg(*p) for p in _args(node, drop_first)]
    ret = f' -> {ast.unparse(node.returns)}' if node.returns is not None else ''
    one = f'{name}({", ".join(parts)}){ret}'
    if len(one) <= 90: return one
    return f'{name}(\n' + ''.join(f'    {p},\n' for p in parts) + f'){ret}'

def params(node, drop_first, comments, comment_lines):
    "nbdev's docments: a parameter's comment on its own line, or on comment-only lines just above it."
    args = [(p, a, d) for p, a, d in _args(node, drop_first) if a is not None]
    by_line = {a.lineno: a.arg for _, a, _ in args}
    out = []
    for prefix, a, d in args:
        c = comments.get(a.lineno) if by_line.get(a.lineno) == a.arg else None
        if c is None:
            above, line = [], a.lineno - 1
            while line in comment_lines and line not in by_line and line > node.lineno:
                above.append(comments[line]); line -= 1
            c = ' '.join(reversed(above)) or None
        out.append((prefix + a.arg, ast.unparse(a.annotation) if a.annotation is not None else '',
                    ast.unparse(d) if d is not None else '', c or ''))
    return out

def _patched_class(fn):
    "fastcore's @patch: `def f(self:Cls, ...)` adds f to Cls."
    if not any(isinstance(d, ast.Name) and d.id == 'patch' for d in fn.decorator_list): return None
    args = fn.args.posonlyargs + fn.args.args
    return ast.unparse(args[0].annotation) if args and args[0].annotation is not None else None

def _is_property(fn): return any(isinstance(d, ast.Name) and d.id in ('property', 'cached_property') for d in fn.decorator_list)

def _init_node(cls):
    for n in cls.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == '__init__': return n
    return None

def _public_method(name): return not name.startswith('_') or name == '__call__'

def module_docs(mod, rel_path):
    "Every name in the module's `__all__`, with the public methods of its classes, read from the source."
    src = (ROOT/rel_path).read_text()
    tree, comments, comment_lines = ast.parse(src), _comments(src), _only_comment_lines(src.splitlines())
    exported = []
    for n in tree.body:
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == '__all__' for t in n.targets):
            exported = ast.literal_eval(n.value)
    defs, methods, values = {}, {}, {}
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            cls = _patched_class(n)
            if cls: methods.setdefault(cls, []).append(n)
            else: defs[n.name] = n
        elif isinstance(n, ast.ClassDef):
            defs[n.name] = n
            methods.setdefault(n.name, []).extend(m for m in n.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for name, value in assigned(n):
                defs.setdefault(name, n)
                values.setdefault(name, value)
    docs = []
    for name in exported:
        n = defs.get(name)
        if n is None:   # bound some other way (an import, a loop): listed, with its module
            docs.append(Doc(mod, name, 'name', None, 1, rel_path, signature=name))
            continue
        if isinstance(n, ast.ClassDef):
            init = _init_node(n)
            bases = ', '.join(ast.unparse(b) for b in n.bases)
            d = Doc(mod, name, 'class', n, n.lineno, rel_path, doc=ast.get_docstring(n) or '')
            is_dc = any('dataclass' in ast.unparse(x) for x in n.decorator_list)
            if init is not None:
                d.signature = f'class {name}({bases})\n' + signature(name, init, True)
                d.params = params(init, True, comments, comment_lines)
            elif is_dc:
                fields = [x for x in n.body if isinstance(x, ast.AnnAssign) and isinstance(x.target, ast.Name)]
                parts = [f'{x.target.id}: {ast.unparse(x.annotation)}' + (f' = {ast.unparse(x.value)}' if x.value else '') for x in fields]
                d.signature = f'class {name}({bases})\n{name}({", ".join(parts)})'
                d.params = [(x.target.id, ast.unparse(x.annotation), ast.unparse(x.value) if x.value else '',
                             comments.get(x.lineno, '')) for x in fields]
            else: d.signature = f'class {name}({bases})' if bases else f'class {name}'
            docs.append(d)
            for m in methods.get(name, []):
                if not _public_method(m.name): continue
                kind = 'property' if _is_property(m) else 'method'
                qn = f'{name}.{m.name}'
                md_ = Doc(mod, qn, kind, m, m.lineno, rel_path, doc=ast.get_docstring(m) or '')
                md_.signature = f'{qn}' if kind == 'property' else signature(qn, m, True)
                if kind == 'method': md_.params = params(m, True, comments, comment_lines)
                docs.append(md_)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            d = Doc(mod, name, 'function', n, n.lineno, rel_path, doc=ast.get_docstring(n) or '')
            d.signature = signature(name, n, False)
            d.params = params(n, False, comments, comment_lines)
            docs.append(d)
        else:
            value = ast.get_source_segment(src, values[name]) if values.get(name) is not None else ''
            first = value.splitlines()[0] if value else ''
            shown_value = value if len(value) <= 100 and '\n' not in value else (first[:100] + ' ...')
            d = Doc(mod, name, 'constant', n, n.lineno, rel_path)
            ann = f': {ast.unparse(n.annotation)}' if isinstance(n, ast.AnnAssign) else ''
            d.signature = f'{name}{ann} = {shown_value}' if shown_value else f'{name}{ann}'
            above, line = [], n.lineno - 1
            while line in comment_lines: above.append(comments[line]); line -= 1
            d.doc = ' '.join(reversed(above)) or comments.get(n.lineno, '')
            docs.append(d)
    return docs

def read_modidx():
    src = (ROOT/'small_doge/_modidx.py').read_text()
    return ast.literal_eval(src[src.index('{'):])['syms']

def all_docs(lessons):
    "The API, module by module in lesson order; each name knows the lesson (and anchor) that builds it."
    by_page = {l.page: l for l in lessons}
    by_module = {l.module: l for l in lessons if l.module}
    syms = read_modidx()
    order = {l.module: i for i, l in enumerate(lessons) if l.module}
    out = []
    for mod in sorted(syms, key=lambda m: (order.get(m, len(order)), m)):
        paths = {v[1] for v in syms[mod].values()}
        if not paths: continue
        for d in module_docs(mod, sorted(paths)[0]):
            url = syms[mod].get(f'{mod}.{d.qualname}', ('',))[0]
            page, _, anchor = url.partition('#')
            d.lesson = by_page.get(page) or by_module.get(mod)
            d.lesson_anchor = anchor if page in by_page else ''
            out.append(d)
    return out

# ---------------------------------------------------------------- rendering
class Site:
    def __init__(self, root=ROOT):
        self.cfg = configparser.ConfigParser()
        self.cfg.read(root/'settings.ini')
        self.files = {}          # docs-relative path -> bytes
        self.search = []         # search index entries
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(SITE), autoescape=False,
                                      keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
        self.anchors = {}        # page -> ids of the show_doc blocks on it
        self.times = json.loads(TIMES.read_text()) if TIMES.exists() else {}

    def setting(self, key, default=''): return self.cfg['DEFAULT'].get(key, default)

    def source_url(self, d):
        return f"{self.setting('git_url')}/blob/{self.setting('branch', 'main')}/{d.path}#L{d.line}"

    # ---- images: written once, named by their content
    def image(self, data, ext):
        raw = base64.b64decode(data) if ext != 'svg' else data.encode()
        name = f'img/{hashlib.sha1(raw).hexdigest()[:16]}.{ext}'
        self.files[name] = raw
        size = ''
        if ext == 'png' and raw[12:16] == b'IHDR':
            w, h = struct.unpack('>II', raw[16:24])
            size = f' width="{w}" height="{h}"'
        return name, size

    def output(self, o, root):
        if o.output_type == 'stream':
            text = '\n'.join(l.rsplit('\r', 1)[-1] for l in o.text.split('\n'))   # progress bars: their last state
            cls = 'out-stderr' if o.name == 'stderr' else 'out-stream'
            return f'<div class="out {cls}"><pre>{ansi2html(text)}</pre></div>'
        if o.output_type == 'error':
            return f'<div class="out out-error"><pre>{ansi2html(chr(10).join(o.traceback))}</pre></div>'
        data = o.get('data', {})
        if 'text/html' in data: return f'<div class="out out-html">{data["text/html"]}</div>'
        if 'text/markdown' in data: return f'<div class="out out-md">{md(data["text/markdown"])}</div>'
        for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/svg+xml', 'svg')):
            if mime in data:
                name, size = self.image(data[mime], ext)
                alt = esc(data.get('text/plain', 'figure').strip('<>'))
                return f'<div class="out out-img"><img src="{root}{name}" alt="{alt}"{size}></div>'
        if 'text/latex' in data: return f'<div class="out out-md">{esc(data["text/latex"])}</div>'
        if 'text/plain' in data: return f'<div class="out out-text"><pre>{ansi2html(data["text/plain"])}</pre></div>'
        return ''

    def code_cell(self, c, root):
        outs = ''.join(self.output(o, root) for o in c.get('outputs', []))
        outs = f'\n<div class="outputs">{outs}</div>' if outs else ''
        return f'<div class="cell code-cell"><div class="input"><pre class="highlight"><code>{code_html(c.source)}</code></pre></div>{outs}</div>'

    def doc_block(self, d, where, root=''):
        "nbdev's show_doc: name, signature, docstring, parameter table; links to the source line and the lesson."
        level = 4 if '.' in d.qualname else 3
        anchor = d.qualname.lower() if where == 'lesson' else d.api_id
        links = []
        if where == 'api' and d.lesson is not None:
            # the show_doc block in the lesson, else its class's (methods have none of their own), else the page
            shown = self.anchors.get(d.lesson.page, set())
            there = next((a for a in (d.lesson_anchor, d.qualname.split('.')[0].lower()) if a in shown), '')
            target = d.lesson.page + (f'#{there}' if there else '')
            links.append(f'<a class="doc-lesson" href="{root}{target}">lesson {esc(d.lesson.label)}</a>')
        if where == 'lesson': links.append(f'<a href="{root}api.html#{d.api_id}">API</a>')
        links.append(f'<a class="doc-source" href="{root}{d.src_page}#L-{d.line}">source</a>')
        if self.setting('git_url'): links.append(f'<a href="{esc(self.source_url(d))}">GitHub</a>')
        rows = ''
        if any(p[3] for p in d.params):   # as show_doc: a table when the parameters are documented
            body = ''.join(f'<tr><td><code>{esc(n)}</code></td><td>{"<code>" + esc(a) + "</code>" if a else ""}</td>'
                           f'<td>{"<code>" + esc(df) + "</code>" if df else ""}</td><td>{inline_md(c) if c else ""}</td></tr>'
                           for n, a, df, c in d.params)
            rows = f'<table class="doc-params"><thead><tr><th></th><th>type</th><th>default</th><th>details</th></tr></thead><tbody>{body}</tbody></table>'
        doc = f'<div class="doc-str">{md(d.doc)}</div>' if d.doc else ''
        return (f'<div class="doc" id="{esc(anchor)}"><div class="doc-head"><h{level}><code>{esc(d.qualname)}</code></h{level}>'
                f'<span class="doc-kind">{d.kind}</span><span class="doc-links">{"".join(links)}</span></div>'
                f'<pre class="doc-sig">{esc(d.signature)}</pre>{doc}{rows}</div>')

    # ---- page assembly
    def page(self, name, title, body, lessons, toc=(), prev=None, next=None, main_class=''):
        root = '../' * name.count('/')
        text = self.env.get_template('page.html').render(
            title=title, site=self.setting('title', 'small-doge'), description=esc(self.setting('description')),
            root=root, page=name, lessons=lessons, body=body, toc=list(toc), prev=prev, next=next, main_class=main_class)
        self.files[name] = text.encode()

    @staticmethod
    def unique_ids(body, taken):
        "Heading ids unique on the page (a heading may repeat, or collide with a show_doc anchor)."
        def fix(m):
            base, i, new = m.group(2), 2, m.group(2)
            while new in taken: new, i = f'{base}-{i}', i + 1
            taken.add(new)
            return m.group(0).replace(f'id="{base}"', f'id="{new}"').replace(f'href="#{base}"', f'href="#{new}"')
        return re.sub(r'<h([1-6]) id="([^"]+)">.*?</h\1>', fix, body, flags=re.S)

    def add_sections(self, label, page, body):
        "Search entries for each h2/h3 section of a page: its heading and the prose under it (not the code)."
        sections, current = [], None
        for chunk in re.split(r'\n(?=<div class="(?:cell|doc)[ "])', body):
            if not chunk.startswith('<div class="cell md-cell'): continue
            for piece in re.split(r'(<h[23] id="[^"]+">.*?</h[23]>)', chunk, flags=re.S):
                if m := re.fullmatch(r'<h[23] id="([^"]+)">(.*?)</h[23]>', piece, re.S):
                    current = {'k': 'section', 't': text_of(m.group(2)), 'u': f'{page}#{m.group(1)}', 'p': label, 'x': ''}
                    sections.append(current)
                elif current is not None: current['x'] += ' ' + text_of(piece)
        for sec in sections: sec['x'] = sec['x'].strip()[:1200]
        self.search += sections

    @staticmethod
    def toc(body):
        return [(int(lv), i, text_of(t)) for lv, i, t in re.findall(r'<h([23]) id="([^"]+)">(.*?)</h[23]>', body, re.S)]

    def lesson_page(self, lesson, lessons, docs, i):
        by_name = {(d.module, d.qualname): d for d in docs}
        cells = list(lesson.cells)
        # the title and summary come first, then the cells above it (the exported imports)
        t = next((k for k, (c, _) in enumerate(cells) if c.cell_type == 'markdown' and TITLE.search(c.source)), None)
        if t: cells = [cells[t]] + cells[:t] + cells[t + 1:]
        parts, ids = [], set()
        for c, ds in cells:
            if c.cell_type == 'markdown':
                src = c.source
                if c is cells[0][0] and (m := TITLE.search(src)):
                    rest = src[m.end():]
                    summ = SUMMARY.search(rest)
                    after = rest[summ.end():] if summ else rest
                    meta = self.lesson_meta(lesson)
                    parts.append(f'<header class="lesson-head"><h1 id="top">{lesson.title_html}</h1>'
                                 + (f'<p class="summary">{inline_md(summ.group(1))}</p>' if summ else '') + meta + '</header>')
                    if after.strip(): parts.append(f'<div class="cell md-cell">{md(after)}</div>')
                else: parts.append(f'<div class="cell md-cell">{md(src)}</div>')
            elif c.cell_type == 'code':
                parts.append(self.code_cell(c, ''))
                words = [d.split() for d in ds if d]
                exp = next((w for w in words if w[0] in ('export', 'exports')), None)
                if exp:
                    mod = f'small_doge.{exp[1]}' if len(exp) > 1 else lesson.module
                    for name in defined_names(c.source):
                        d = by_name.get((mod, name))
                        if d and d.qualname.lower() not in ids:
                            ids.add(d.qualname.lower())
                            parts.append(self.doc_block(d, 'lesson'))
            elif c.cell_type == 'raw' and 'html' in (c.metadata.get('format', '') + c.metadata.get('raw_mimetype', '')):
                parts.append(c.source)
        self.anchors[lesson.page] = set(ids)
        body = self.unique_ids('\n'.join(parts), set(ids))   # the title's id="top" comes first
        self.search.append({'k': 'lesson', 't': lesson.label, 'u': lesson.page, 'p': lesson.module or '', 'x': lesson.summary})
        self.add_sections(lesson.label, lesson.page, body)
        prev = lessons[i - 1] if i > 0 else None
        nxt = lessons[i + 1] if i + 1 < len(lessons) else None
        self.page(lesson.page, text_of(lesson.title_html), body, lessons, self.toc(body), prev, nxt)

    def lesson_meta(self, lesson):
        bits = []
        if lesson.module: bits.append(f'module <code>{lesson.module}</code>')
        secs = self.cpu_secs(lesson)
        if secs is not None: bits.append(f'about {fmt_secs(secs)} on one CPU core at test sizes')
        bits.append(f'open it: <code>jupyter lab nbs/{lesson.path.name}</code>')
        return '<p class="lesson-meta">' + ' &middot; '.join(bits) + '</p>'

    def cpu_secs(self, lesson):
        "The lesson's measured CPU time (.ci/lesson_times.py), or None."
        return self.times.get('lessons', {}).get(lesson.stem, {}).get('cpu')

    def lesson_map(self, lessons, index_rows):
        rows = []
        for l in lessons:
            builds = index_rows.get(l.stem) or inline_md(l.summary)
            secs = self.cpu_secs(l)
            rows.append(f'<tr><td><a href="{l.page}">{esc(l.num)} {l.title_html}</a></td><td>{builds}</td>'
                        f'<td>{"<code>" + l.module + "</code>" if l.module else ""}</td>'
                        f'<td class="time">{fmt_secs(secs) if secs is not None else "not measured"}</td></tr>')
        how = self.times.get('how', '')
        return ('<table class="lesson-map"><thead><tr><th>lesson</th><th>what it builds</th><th>module</th>'
                '<th>runtime on a CPU</th></tr></thead><tbody>' + ''.join(rows) + '</tbody></table>'
                + (f'<p class="footnote">Runtime: {inline_md(how)}</p>' if how else ''))

    def index_page(self, lessons):
        cells = shown_cells(ROOT/'nbs/index.ipynb')
        parts, index_rows, placed = [], {}, False
        for c, _ in cells:
            if c.cell_type != 'markdown': continue
            src = c.source
            if re.match(r'^##\s+The lessons', src) and not placed:
                lines = src.splitlines()
                tab = [k for k, l in enumerate(lines) if l.lstrip().startswith('|')]
                if tab:
                    for l in lines[tab[0] + 2: tab[-1] + 1]:
                        cols = [x.strip() for x in l.strip().strip('|').split('|')]
                        if len(cols) >= 3: index_rows[cols[0].strip('`')] = inline_md(cols[2])
                    before, after = '\n'.join(lines[:tab[0]]), '\n'.join(lines[tab[-1] + 1:])
                    parts.append(('map', md(before), md(after)))
                    placed = True
                    continue
            parts.append(('md', md(src), ''))
        html_parts = []
        for kind, a, b in parts:
            if kind == 'map': html_parts.append(f'<div class="cell md-cell">{a}{self.lesson_map(lessons, index_rows)}{b}</div>')
            else: html_parts.append(f'<div class="cell md-cell page-md">{a}</div>')
        if not placed: html_parts.insert(1, f'<div class="cell md-cell"><h2 id="The-lessons">The lessons</h2>{self.lesson_map(lessons, index_rows)}</div>')
        body = '\n'.join(html_parts)
        body = body.replace('<div class="cell md-cell page-md"><h1 ', '<div class="cell md-cell page-md landing-title"><h1 ', 1)
        body = self.unique_ids(body, set())
        self.add_sections('Start here', 'index.html', body)
        self.page('index.html', self.setting('title', 'small-doge'), body, lessons, self.toc(body),
                  next=lessons[0] if lessons else None)

    def api_page(self, lessons, docs):
        parts, mods = ['<h1 id="top">API reference</h1><p class="summary">Every name the <code>small_doge</code> '
                       'modules export, in lesson order: signature, docstring, parameters, the lesson that builds it '
                       'and the line that defines it.</p>'], {}
        for d in docs: mods.setdefault(d.module, []).append(d)
        for mod, ds in mods.items():
            lesson = next((d.lesson for d in ds if d.lesson), None)
            mod_doc = ast.get_docstring(ast.parse((ROOT/ds[0].path).read_text())) or ''
            head = f'<h2 id="{mod}">{mod}</h2>'
            intro = (f'<p>{inline_md(mod_doc)}' if mod_doc else '<p>') + (
                f' Built in lesson <a href="{lesson.page}">{esc(lesson.label)}</a>.' if lesson else '') + '</p>'
            parts.append(f'<section class="api-module">{head}{intro}' + ''.join(self.doc_block(d, 'api') for d in ds) + '</section>')
            for d in ds:
                first = d.doc.strip().split('\n\n')[0] if d.doc else ''
                self.search.append({'k': 'api', 't': d.qualname, 'u': f'api.html#{d.api_id}', 'p': mod,
                                    'x': (d.signature.split('\n')[-1] if d.kind == 'class' else d.signature.replace('\n', ' ')) + ' ' + first})
        body = '\n'.join(parts)
        toc = [(2, m, m) for m in mods]
        self.page('api.html', 'API reference', body, lessons, toc, main_class='api')

    def source_pages(self, docs, lessons):
        for short, rel in sorted({(d.short_module, d.path) for d in docs}):
            # an empty anchor starts each line (CSS numbers them): src/attention.html#L-15 is line 15
            lines = code_html((ROOT/rel).read_text()).split('\n')
            code = '\n'.join(f'<span class="ln" id="L-{i}"></span>{l}' for i, l in enumerate(lines, 1))
            lesson = next((d.lesson for d in docs if d.path == rel and d.lesson), None)
            made = f'lesson <a href="../{lesson.page}">{esc(lesson.label)}</a>' if lesson else 'its lesson'
            body = (f'<h1 id="top"><code>{esc(rel)}</code></h1><p class="summary">Exported by nbdev from {made}: '
                    f'edit the notebook, not this file.</p><div class="source"><pre class="highlight"><code>{code}</code></pre></div>')
            self.page(f'src/{short}.html', rel, body, lessons, main_class='source-page')

    def build_notes(self, lessons):
        body = md((SITE/'build-notes.md').read_text())
        body = self.unique_ids(body, set())
        self.add_sections('About this site', 'build.html', body)
        self.page('build.html', 'About this site', f'<div class="cell md-cell page-md">{body}</div>', lessons, self.toc(body))

    def assets(self):
        css = (SITE/'site.css').read_text() + '\n/* Pygments (' + PYGMENTS_STYLE + ') */\n' + \
            HtmlFormatter(style=PYGMENTS_STYLE).get_style_defs('.highlight') + '\n'
        self.files['assets/site.css'] = css.encode()
        self.files['assets/site.js'] = (SITE/'site.js').read_bytes()
        for p in sorted((SITE/'katex').rglob('*')):
            if p.is_file(): self.files[f'assets/katex/{p.relative_to(SITE/"katex").as_posix()}'] = p.read_bytes()
        index = json.dumps({'docs': self.search}, ensure_ascii=False, separators=(',', ':'), sort_keys=True)
        self.files['assets/search-index.js'] = f'window.SEARCH_INDEX = {index};\n'.encode()

def defined_names(src):
    "Top-level names a code cell defines (functions, classes, assignments; @patch methods as Class.name)."
    try: tree = ast.parse(src)
    except SyntaxError: return []
    out = []
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            cls = _patched_class(n)
            out.append(f'{cls}.{n.name}' if cls else n.name)
        elif isinstance(n, ast.ClassDef): out.append(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)): out += [name for name, _ in assigned(n)]
    return out

def assigned(n):
    "(name, value) for each name an assignment binds: `A = 1`, `A: int = 1`, `A, B = 1, 2` (value None if unknown)."
    out = []
    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
        if isinstance(t, ast.Name): out.append((t.id, n.value))
        elif isinstance(t, ast.Tuple):
            vals = n.value.elts if isinstance(n.value, ast.Tuple) and len(n.value.elts) == len(t.elts) else [None] * len(t.elts)
            out += [(e.id, v) for e, v in zip(t.elts, vals) if isinstance(e, ast.Name)]
    return out

def fmt_secs(s):
    s = float(s)
    if s < 60: return f'{max(1, round(s))} s'
    m, r = divmod(round(s), 60)
    return f'{m} min {r:02d} s' if m < 60 else f'{m // 60} h {m % 60:02d} min'

def render():
    "Every file of the site: {docs-relative path: bytes}."
    lessons = [read_lesson(p) for p in lesson_notebooks(ROOT/'nbs') if p.stem != 'index']
    pages = [l.page for l in lessons]
    clash = [p for p in pages if p in RESERVED or pages.count(p) > 1]
    if clash: sys.exit(f'docs: lesson page names clash: {sorted(set(clash))} (rename the notebook)')
    docs = all_docs(lessons)
    site = Site()
    site.index_page(lessons)
    for i, l in enumerate(lessons): site.lesson_page(l, lessons, docs, i)
    site.api_page(lessons, docs)
    site.source_pages(docs, lessons)
    site.build_notes(lessons)
    site.assets()
    return dict(sorted(site.files.items()))

def write(files, out):
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(out.rglob('*'), reverse=True):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel not in files: p.unlink()
        elif p.is_dir() and not any(p.iterdir()): p.rmdir()
    for rel, data in files.items():
        f = out/rel
        if f.exists() and f.read_bytes() == data: continue
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)

def stale(files, out):
    "Paths under `out` that differ from `files`, are missing, or should not be there."
    have = {p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file()} if out.exists() else set()
    bad = [r for r, d in files.items() if r not in have or (out/r).read_bytes() != d]
    return bad + sorted(have - set(files))

if __name__ == '__main__':
    args = sys.argv[1:]
    out = Path(args[args.index('--out') + 1]) if '--out' in args else ROOT/'docs'
    files = render()
    if '--check' in args:
        if bad := stale(files, out):
            sys.exit(f'docs/ is out of date ({", ".join(bad[:10])}{" ..." if len(bad) > 10 else ""}): '
                     'run `python .ci/docs.py` and commit it')
    else:
        write(files, out)
        print(f'docs: {len(files)} files, {sum(map(len, files.values())) / 1e6:.1f} MB in {out}')
