"use strict";
// How a reply becomes part of the page. Markdown goes through marked (with TeX math by KaTeX and InternVL's
// grounding tags), then DOMPurify. Model output is never trusted: HTML the model writes is shown as text, links keep
// only http(s)/mailto targets, images load only from data: URLs (a remote one is shown as its address instead), and
// the sanitizer removes anything else that could run or fetch. The page's Content-Security-Policy is a second line.
// While a reply streams, it is re-rendered at most once per animation frame (less often when a render is slow), and
// only the top-level blocks that changed are replaced in the page.
(function () {
  // InternVL grounding: <ref>label</ref><box>[[x1,y1,x2,y2], ...]</box>, coordinates in 0..1000 of the image.
  const GROUND = /<ref>(.*?)<\/ref>\s*<box>(\[\[.*?\]\])<\/box>/gs;

  function parseGrounding(text) {
    const out = [];
    for (const m of text.matchAll(GROUND)) {
      try { for (const b of JSON.parse(m[2])) if (b.length === 4) out.push({ label: m[1], box: b }); } catch (e) {}
    }
    return out;
  }

  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

  // Text with its grounding references marked (the boxes themselves are drawn on the image, not shown as text).
  function refsToHtml(text) {
    let out = "", last = 0;
    for (const m of text.matchAll(GROUND)) {
      out += escapeHtml(text.slice(last, m.index)) + `<span class="ref">${escapeHtml(m[1])}</span>`;
      last = m.index + m[0].length;
    }
    return out + escapeHtml(text.slice(last));
  }

  // Each formula is typeset and sanitized once, then kept while a reply streams: the Markdown's HTML holds an empty
  // slot for it (so the sanitizer's per-frame pass stays small), and each frame fills the slots with copies.
  let formulas = [], slotOf = new Map();
  function tex(source, display) {
    const key = (display ? "D" : "I") + source;
    let k = slotOf.get(key);
    if (k === undefined) {
      let html;
      try {
        // trust: false keeps \href, \url, \includegraphics and \htmlClass from making links, loads or markup
        html = katex.renderToString(source, { displayMode: display, throwOnError: false, trust: false,
                                              strict: "ignore", maxSize: 50, maxExpand: 1000 });
      } catch (e) { html = `<code class="tex-error">${escapeHtml(source)}</code>`; }
      k = formulas.push(purify.sanitize(html, PURIFY)) - 1;
      slotOf.set(key, k);
    }
    return `<span class="math-slot" data-k="${k}"></span>`;
  }

  function fillMath(node) {
    const slots = node.matches && node.matches("span.math-slot") ? [node] : node.querySelectorAll("span.math-slot");
    for (const slot of slots) {
      const formula = formulas[+slot.dataset.k];
      if (formula) slot.replaceWith(formula.cloneNode(true));
    }
  }

  // Display math on lines of its own: $$ ... $$ or \[ ... \].
  const mathBlock = {
    name: "mathBlock", level: "block",
    start(src) { const m = /(?:^|\n) {0,3}(?:\$\$|\\\[)/.exec(src); return m ? m.index + (m[0][0] === "\n") : undefined; },
    tokenizer(src) {
      const m = /^ {0,3}(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n+|$)/.exec(src);
      if (m) return { type: "mathBlock", raw: m[0], text: (m[1] ?? m[2]).trim() };
    },
    renderer(t) { return `<div class="math-display">${tex(t.text, true)}</div>`; },
  };

  // Math within a line: \( ... \), $ ... $ (no space inside the dollars, no digit after: "$5 or $6" stays text),
  // and $$ ... $$ or \[ ... \] written inside a paragraph (shown as display math).
  const INLINE_MATH = [
    [/^\$\$([^$]+?)\$\$/, true],
    [/^\\\[([\s\S]+?)\\\]/, true],
    [/^\\\(([\s\S]+?)\\\)/, false],
    [/^\$(?![\s$])((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)/, false],
  ];
  const mathInline = {
    name: "mathInline", level: "inline",
    start(src) { const i = src.search(/\$|\\[([]/); return i < 0 ? undefined : i; },
    tokenizer(src) {
      for (const [re, display] of INLINE_MATH) {
        const m = re.exec(src);
        if (m) return { type: "mathInline", raw: m[0], text: m[1].trim(), display };
      }
    },
    renderer(t) { return t.display ? `<span class="math-display">${tex(t.text, true)}</span>` : tex(t.text, false); },
  };

  const grounding = {
    name: "grounding", level: "inline",
    start(src) { const i = src.indexOf("<ref>"); return i < 0 ? undefined : i; },
    tokenizer(src) {
      const m = /^<ref>(.*?)<\/ref>(?:\s*<box>\[\[.*?\]\]<\/box>)?/s.exec(src);
      if (m) return { type: "grounding", raw: m[0], text: m[1] };
    },
    renderer(t) { return `<span class="ref">${escapeHtml(t.text)}</span>`; },
  };

  const md = new marked.Marked({ gfm: true, breaks: false }, {
    extensions: [mathBlock, mathInline, grounding],
    renderer: {
      // HTML in a reply is the model's text, not markup: show it as written.
      html(t) { return t.block ? `<p class="raw">${refsToHtml(t.text.trimEnd())}</p>` : refsToHtml(t.text); },
      image(t) {
        if (/^data:image\/(png|jpeg|gif|webp);/i.test(t.href))
          return `<img src="${escapeHtml(t.href)}" alt="${escapeHtml(t.text)}">`;
        return `<span class="blocked-img" title="remote images are not loaded">image ${escapeHtml(t.text)}` +
               ` (${escapeHtml(t.href)})</span>`;
      },
    },
  });

  const SAFE_LINK = /^(?:https?:|mailto:|#)/i;
  const PURIFY = {
    ALLOWED_URI_REGEXP: SAFE_LINK,
    // KaTeX's MathML keeps the TeX source in <semantics><annotation> (plain text, read by screen readers and
    // copy-paste); DOMPurify leaves both out by default. annotation-xml, the risky one, stays out.
    ADD_TAGS: ["semantics", "annotation"],
    ADD_ATTR: ["encoding"],
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "frame", "object", "embed",
                  "link", "meta", "base", "video", "audio", "source", "track", "picture", "use", "image", "foreignObject"],
    FORBID_ATTR: ["srcset", "action", "formaction", "ping", "background", "poster", "xlink:href"],
    RETURN_DOM_FRAGMENT: true,
  };
  const purify = DOMPurify(window);
  purify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeType !== Node.ELEMENT_NODE) return;
    if (node.tagName === "A") {
      if (!SAFE_LINK.test(node.getAttribute("href") || "")) node.removeAttribute("href");
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    } else if (node.hasAttribute("href")) node.removeAttribute("href");
    if (node.hasAttribute("src") && !/^data:image\//i.test(node.getAttribute("src"))) node.removeAttribute("src");
    // CSS can fetch too (url(), @import): KaTeX's sizes and colours never need either.
    const style = node.getAttribute("style");
    if (style && /url\s*\(|@import|expression|\\/i.test(style)) node.removeAttribute("style");
  });

  // Markdown text -> a sanitized DocumentFragment, its formulas still empty slots (see tex).
  function markdownFragment(text) {
    if (formulas.length > 5000) { formulas = []; slotOf = new Map(); }
    return purify.sanitize(md.parse(text).trim(), PURIFY);
  }

  // Give each code block a Copy button (and its language); returns what now stands where `block` stood.
  function decorateCode(block) {
    let top = block;
    for (const pre of block.matches("pre") ? [block] : block.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      if (!code) continue;
      const wrap = document.createElement("div");
      wrap.className = "code";
      pre.replaceWith(wrap);
      if (pre === block) top = wrap;
      wrap.append(pre);
      const lang = (code.className.match(/language-(\S+)/) || [])[1];
      if (lang) {
        const tag = document.createElement("span");
        tag.className = "lang";
        tag.textContent = lang;
        wrap.append(tag);
      }
      const copy = document.createElement("button");
      copy.className = "copy";
      copy.type = "button";
      copy.textContent = "Copy";
      copy.addEventListener("click", () => copyText(code.textContent.replace(/\n$/, ""), copy));
      wrap.append(copy);
    }
    return top;
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {  // no clipboard API (a plain-http page on another host): copy through a selection
      const area = document.createElement("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  // Replace el's children by the fragment's, keeping the leading blocks that did not change (so a streaming reply
  // does not rebuild, and a code block's Copy button stays clickable, once its block is complete).
  function patch(el, fragment) {
    const fresh = [...fragment.childNodes];
    const old = [...el.childNodes];
    let same = 0;
    while (same < fresh.length && same < old.length && old[same].__source === htmlOf(fresh[same])) same++;
    for (const node of old.slice(same)) node.remove();
    for (const node of fresh.slice(same)) {
      const source = htmlOf(node);
      el.append(node);
      if (node.nodeType === Node.ELEMENT_NODE) fillMath(node);
      (node.nodeType === Node.ELEMENT_NODE ? decorateCode(node) : node).__source = source;
    }
  }
  const htmlOf = (node) => (node.nodeType === Node.ELEMENT_NODE ? node.outerHTML : node.textContent);

  function renderMarkdown(el, text) {
    el.classList.add("md");
    patch(el, markdownFragment(text));
  }

  // A JSON reply, indented; while incomplete (or not JSON at all) it is shown as it came.
  function renderJSON(el, text) {
    let shown = text;
    try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) {}
    let code = el.querySelector("pre.json > code");
    if (!code) {
      el.textContent = "";
      const pre = document.createElement("pre");
      pre.className = "json";
      code = document.createElement("code");
      pre.append(code);
      el.append(pre);
    }
    code.textContent = shown;
  }

  // OpenAI tool calls ({id, type: "function", function: {name, arguments}}): name and indented arguments.
  function renderToolCalls(el, calls) {
    el.textContent = "";
    for (const call of calls) {
      if (!call) continue;
      const fn = call.function || {};
      const box = document.createElement("div");
      box.className = "tool-call";
      const name = document.createElement("div");
      name.className = "name";
      name.textContent = fn.name || "";
      if (call.id) {
        const id = document.createElement("span");
        id.className = "id";
        id.textContent = call.id;
        name.append(id);
      }
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      let args = fn.arguments || "";
      try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) {}
      code.textContent = args;
      pre.append(code);
      box.append(name, pre);
      el.append(box);
    }
  }

  // Fold one streamed `delta.tool_calls` list into `calls` (by index; arguments arrive in pieces).
  function mergeToolCalls(calls, deltas) {
    for (const d of deltas) {
      const i = d.index ?? calls.length;
      const call = calls[i] || (calls[i] = { id: "", type: "function", function: { name: "", arguments: "" } });
      if (d.id) call.id = d.id;
      if (d.type) call.type = d.type;
      if (d.function && d.function.name) call.function.name = call.function.name || d.function.name;
      if (d.function && d.function.arguments) call.function.arguments += d.function.arguments;
    }
    return calls;
  }

  // A view of one growing reply: update() as text arrives (rendered on the next frame, at most ~20% of the time
  // spent rendering), flush() to render what has come now.
  function liveView(el, render) {
    let text = "", pending = false, raf = 0, timer = 0, busyUntil = 0;
    const draw = () => {
      pending = false; raf = 0;
      const t0 = performance.now();
      render(el, text);
      const t1 = performance.now();
      busyUntil = t1 + 4 * (t1 - t0);
      el.dataset.renders = String(+(el.dataset.renders || 0) + 1);
    };
    return {
      update(value) {
        text = value;
        if (pending) return;
        pending = true;
        const wait = busyUntil - performance.now();
        if (wait > 0) timer = setTimeout(() => { timer = 0; raf = requestAnimationFrame(draw); }, wait);
        else raf = requestAnimationFrame(draw);
      },
      flush(value) {
        if (value !== undefined) text = value;
        if (timer) clearTimeout(timer);
        if (raf) cancelAnimationFrame(raf);
        timer = 0;
        draw();
      },
    };
  }

  window.mlxRender = { parseGrounding, renderMarkdown, renderJSON, renderToolCalls, mergeToolCalls, liveView };
})();
