#!/usr/bin/env node
// Reference ids for a Hugging Face tokenizer.json from @lenml/tokenizers (transformers.js's
// tokenizers): encode(text, {add_special_tokens}) and decode(ids) of each input text.
// Usage: node hf_encode.js NPM_NODE_MODULES_DIR TOKENIZER_JSON TOKENIZER_CONFIG_JSON INPUT OUTPUT
// INPUT: records of u32 flags (bit 0: add special tokens), u32 byte length, UTF-8 text.
// OUTPUT: per record u32 id count, the ids (int32), u32 byte length, the decoded text
// (decode(ids) with clean_up_tokenization_spaces false), all little-endian.
// Prints the encoder's throughput over all records to stderr.
'use strict';
const fs = require('fs');
const path = require('path');

const [npmDir, tokPath, cfgPath, inFile, outFile] = process.argv.slice(2);
if (!outFile) {
  console.error('usage: node hf_encode.js NPM_NODE_MODULES_DIR TOKENIZER_JSON CONFIG_JSON INPUT OUTPUT');
  process.exit(2);
}
const { TokenizerLoader } = require(path.join(path.resolve(npmDir), '@lenml/tokenizers'));
const tokenizerJSON = JSON.parse(fs.readFileSync(tokPath, 'utf8'));
const tokenizerConfig = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });

const input = fs.readFileSync(inFile);
const texts = [];
for (let p = 0; p < input.length;) {
  const flags = input.readUInt32LE(p), len = input.readUInt32LE(p + 4);
  texts.push({ add: (flags & 1) !== 0, text: input.toString('utf8', p + 8, p + 8 + len), bytes: len });
  p += 8 + len;
}

const t0 = process.hrtime.bigint();
const all = texts.map((x) => tok.encode(x.text, { add_special_tokens: x.add }));
const secs = Number(process.hrtime.bigint() - t0) / 1e9;

const parts = [];
all.forEach((ids, k) => {
  const head = Buffer.alloc(4 + 4 * ids.length);
  head.writeUInt32LE(ids.length, 0);
  ids.forEach((id, i) => {
    if (!Number.isInteger(id)) {
      console.error(`hf_encode.js: text ${k} encoded to a non-integer id at ${i}`);
      process.exit(1);
    }
    head.writeInt32LE(id, 4 + 4 * i);
  });
  // decode() refuses an empty list; the empty text is what it would mean.
  const text = Buffer.from(ids.length ? tok.decode(ids, { clean_up_tokenization_spaces: false }) : '', 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32LE(text.length, 0);
  parts.push(head, len, text);
});
fs.writeFileSync(outFile, Buffer.concat(parts));
const bytes = texts.reduce((a, x) => a + x.bytes, 0);
console.error(`@lenml/tokenizers ${path.basename(path.dirname(path.dirname(tokPath)))}: ${bytes} bytes in ` +
              `${texts.length} texts -> ${all.reduce((a, x) => a + x.length, 0)} ids in ${secs.toFixed(3)} s ` +
              `(${(bytes / 1e6 / secs).toFixed(2)} MB/s)`);
