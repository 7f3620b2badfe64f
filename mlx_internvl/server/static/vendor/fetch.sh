#!/usr/bin/env bash
# Re-fetch the chat page's vendored libraries from the npm registry: pinned versions, each tarball checked against
# its sha256 below, then only the browser builds, the KaTeX CSS with its woff2 fonts, and the licenses are kept.
# Run from anywhere; needs npm. Afterwards `sha256sum -c SHA256SUMS` (in this folder) checks the committed files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fetch() {  # name version sha256-of-tarball
    (cd "$work" && npm pack --silent "$1@$2" >/dev/null)
    local tgz="$work/$1-$2.tgz"
    echo "$3  $tgz" | sha256sum -c --quiet -
    mkdir -p "$work/$1"
    tar xzf "$tgz" -C "$work/$1"
}

fetch marked 18.3.0 ac4b23ef5425d83f7aad00a81640d29e5b0fd81a6361a30fa96b4b8bb228ad24
fetch dompurify 3.5.0 faa5f2bfe2814384b83d6edb4ed66812fbfdb2a654b4d59edd4b12304058ec20
fetch katex 0.19.1 24da5a599eb2fcede2e270b99a6ff48bca816beecc95feeb84e8cccbd1bb34fd

rm -rf "$here/marked" "$here/dompurify" "$here/katex"
mkdir -p "$here/marked" "$here/dompurify" "$here/katex/fonts"
cp "$work/marked/package/lib/marked.umd.js" "$work/marked/package/LICENSE" "$here/marked/"
cp "$work/dompurify/package/dist/purify.min.js" "$work/dompurify/package/LICENSE" "$here/dompurify/"
cp "$work/katex/package/dist/katex.min.js" "$work/katex/package/dist/katex.min.css" "$work/katex/package/LICENSE" \
   "$here/katex/"
# Every browser the page supports takes woff2, the first source in katex.min.css; the woff/ttf fallbacks are left out.
cp "$work/katex/package/dist/fonts/"*.woff2 "$here/katex/fonts/"
(cd "$here" && find marked dompurify katex -type f | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
echo "vendored into $here"
