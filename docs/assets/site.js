// small-doge course site: formulas (KaTeX, vendored), search over lessons and API names, the page's table of contents.
// Everything is local: the search index is a script (search-index.js), so the site works from file:// too.
(function () {
  'use strict';

  function renderMath() {
    if (!window.renderMathInElement) { document.body.dataset.math = 'no-katex'; return; }
    document.querySelectorAll('.md-cell, .out-md, .doc-str, .doc-params, .summary, .lesson-map').forEach(function (el) {
      window.renderMathInElement(el, {
        delimiters: [
          { left: '$$', right: '$$', display: true },
          { left: '\\[', right: '\\]', display: true },
          { left: '$', right: '$', display: false },
          { left: '\\(', right: '\\)', display: false },
        ],
        throwOnError: false,
      });
    });
    document.body.dataset.math = 'done';
  }

  // ---- search ----
  var input, panel, hits = [], active = -1;

  function terms(q) { return q.toLowerCase().split(/\s+/).filter(Boolean); }

  function score(doc, ts) {
    var title = doc.t.toLowerCase(), text = (doc.x || '').toLowerCase(), total = 0;
    for (var i = 0; i < ts.length; i++) {
      var t = ts[i], s = 0;
      if (doc.k === 'api' && (title === t || title.endsWith('.' + t))) s = 100;
      else if (title.startsWith(t)) s = 40;
      else if (title.indexOf(t) >= 0) s = 20;
      else if (text.indexOf(t) >= 0) s = 2 + Math.min(text.split(t).length - 1, 5);
      if (!s) return 0;
      total += s;
    }
    return total + (doc.k === 'lesson' ? 3 : doc.k === 'api' ? 2 : 0);
  }

  function snippet(doc, ts) {
    var text = doc.x || '', low = text.toLowerCase(), at = -1;
    for (var i = 0; i < ts.length && at < 0; i++) at = low.indexOf(ts[i]);
    if (at < 0) return text.slice(0, 140);
    var start = Math.max(0, at - 50);
    return (start ? '\u2026' : '') + text.slice(start, start + 140) + '\u2026';
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  function show(q) {
    var ts = terms(q), docs = (window.SEARCH_INDEX || {}).docs || [];
    panel.textContent = '';
    hits = [];
    active = -1;
    if (!ts.length) { panel.hidden = true; return; }
    var scored = [];
    for (var i = 0; i < docs.length; i++) {
      var s = score(docs[i], ts);
      if (s) scored.push([s, i]);
    }
    scored.sort(function (a, b) { return b[0] - a[0] || a[1] - b[1]; });
    scored.slice(0, 15).forEach(function (pair) {
      var doc = docs[pair[1]], a = el('a', 'hit hit-' + doc.k);
      a.href = (document.body.dataset.root || '') + doc.u;
      var head = el('div', 'hit-head');
      head.appendChild(el('span', 'hit-kind', doc.k === 'api' ? 'API' : doc.k));
      head.appendChild(el('span', 'hit-title', doc.t));
      if (doc.p) head.appendChild(el('span', 'hit-page', doc.p));
      a.appendChild(head);
      a.appendChild(el('div', 'hit-text', snippet(doc, ts)));
      panel.appendChild(a);
      hits.push(a);
    });
    if (!hits.length) panel.appendChild(el('div', 'hit-none', 'No results for \u201c' + q + '\u201d'));
    panel.hidden = false;
  }

  function move(d) {
    if (!hits.length) return;
    if (active >= 0) hits[active].classList.remove('active');
    active = (active + d + hits.length) % hits.length;
    hits[active].classList.add('active');
    hits[active].scrollIntoView({ block: 'nearest' });
  }

  function setupSearch() {
    input = document.getElementById('search');
    panel = document.getElementById('search-results');
    if (!input || !panel) return;
    input.addEventListener('input', function () { show(input.value); });
    input.addEventListener('focus', function () { if (input.value) show(input.value); });
    input.addEventListener('keydown', function (e) {
      if (e.key === 'ArrowDown') { move(1); e.preventDefault(); }
      else if (e.key === 'ArrowUp') { move(-1); e.preventDefault(); }
      else if (e.key === 'Enter' && hits.length) { window.location.href = hits[Math.max(active, 0)].href; }
      else if (e.key === 'Escape') { panel.hidden = true; input.blur(); }
    });
    document.addEventListener('click', function (e) {
      if (!panel.contains(e.target) && e.target !== input) panel.hidden = true;
    });
    document.addEventListener('keydown', function (e) {
      if (e.key === '/' && document.activeElement !== input) { input.focus(); e.preventDefault(); }
    });
  }

  // ---- table of contents: mark the section being read ----
  function setupToc() {
    var links = document.querySelectorAll('.toc a[href^="#"]');
    if (!links.length || !window.IntersectionObserver) return;
    var byId = {};
    links.forEach(function (a) { byId[decodeURIComponent(a.getAttribute('href').slice(1))] = a; });
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (!entry.isIntersecting) return;
        links.forEach(function (a) { a.classList.remove('current'); });
        var a = byId[entry.target.id];
        if (a) a.classList.add('current');
      });
    }, { rootMargin: '0px 0px -70% 0px' });
    Object.keys(byId).forEach(function (id) {
      var h = document.getElementById(id);
      if (h) observer.observe(h);
    });
  }

  document.addEventListener('DOMContentLoaded', function () {
    renderMath();
    setupSearch();
    setupToc();
  });
})();
