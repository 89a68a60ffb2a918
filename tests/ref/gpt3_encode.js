#!/usr/bin/env node
// Reference GPT-2 ids from the npm package gpt-3-encoder (its own index.js encode()).
// Usage: node gpt3_encode.js NPM_NODE_MODULES_DIR INPUT_FILE OUTPUT_IDS_FILE
// Reads INPUT_FILE as UTF-8 (invalid bytes become U+FFFD, as in any JS string),
// writes the ids as little-endian int32 and prints the encoder's throughput to stderr.
'use strict';
const fs = require('fs');
const path = require('path');

const [npmDir, inFile, outFile] = process.argv.slice(2);
if (!outFile) {
  console.error('usage: node gpt3_encode.js NPM_NODE_MODULES_DIR INPUT_FILE OUTPUT_IDS_FILE');
  process.exit(2);
}
const { encode } = require(path.join(path.resolve(npmDir), 'gpt-3-encoder'));

// encode() grows its result with Array.concat, quadratic in the number of ids, so
// a multi-megabyte text is encoded in pieces. Pieces end after a match of the
// package's own pre-tokenisation regex (copied from Encoder.js) that is not all
// whitespace: \s+(?!\S) looks ahead, so a piece must not end inside or right
// after a run of spaces. The matches of each piece are then exactly those of the
// whole text, and so are the ids.
const pat = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

function encodeLarge(text, pieceChars) {
  const ids = [];
  let start = 0, end = 0;
  for (const m of text.matchAll(pat)) {
    if (m.index !== end) throw new Error('regex skipped text at ' + end);
    end = m.index + m[0].length;
    if (end - start >= pieceChars && /\S/u.test(m[0])) {
      for (const id of encode(text.slice(start, end))) ids.push(id);
      start = end;
    }
  }
  if (end !== text.length) throw new Error('regex did not cover the text');
  if (start < end) for (const id of encode(text.slice(start, end))) ids.push(id);
  return ids;
}

const text = fs.readFileSync(inFile, 'utf8');

// Self-check of the piecewise encoding on a prefix small enough for one encode() call.
const probe = text.slice(0, 20000);
const whole = encode(probe), pieces = encodeLarge(probe, 97);
if (whole.length !== pieces.length || whole.some((x, i) => x !== pieces[i])) {
  console.error('gpt3_encode.js: piecewise encoding differs from encode() on the whole prefix');
  process.exit(1);
}

const t0 = process.hrtime.bigint();
const ids = encodeLarge(text, 1024);
const secs = Number(process.hrtime.bigint() - t0) / 1e9;

const out = Buffer.alloc(ids.length * 4);
ids.forEach((id, i) => {
  if (!Number.isInteger(id)) {
    console.error('gpt3_encode.js: encode() produced a non-integer id at ' + i);
    process.exit(1);
  }
  out.writeInt32LE(id, i * 4);
});
fs.writeFileSync(outFile, out);
const bytes = Buffer.byteLength(text, 'utf8');
console.error(`gpt-3-encoder: ${bytes} bytes -> ${ids.length} ids in ${secs.toFixed(3)} s ` +
              `(${(bytes / 1e6 / secs).toFixed(2)} MB/s)`);
