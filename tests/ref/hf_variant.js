#!/usr/bin/env node
// Writes a variant of a real tokenizer.json, to test components the npm files do not use
// against the same reference encoder. Usage: node hf_variant.js IN OUT KIND
//   metaspace: Llama 2's Prepend+Replace normalizer replaced by a Metaspace pre-tokenizer
//              (prepend_scheme "first", split false), as newer Llama/Mistral conversions write
//   qwen2:     Llama 3 with Qwen2's Split regex (\p{N} one digit at a time), merges written
//              as [a, b] pairs (tokenizers >= 0.20), lstrip on <|eot_id|> and rstrip on
//              <|start_header_id|>
//   qwen2nfc:  qwen2 with Qwen2's NFC normalizer
'use strict';
const fs = require('fs');
const [inFile, outFile, kind] = process.argv.slice(2);
const j = JSON.parse(fs.readFileSync(inFile, 'utf8'));
if (kind === 'metaspace') {
  j.normalizer = null;
  j.pre_tokenizer = { type: 'Metaspace', replacement: '\u2581', add_prefix_space: true,
                      prepend_scheme: 'first', split: false };
} else if (kind === 'qwen2' || kind === 'qwen2nfc') {
  if (kind === 'qwen2nfc') j.normalizer = { type: 'NFC' };
  const split = j.pre_tokenizer.pretokenizers[0];
  split.pattern.Regex = split.pattern.Regex.replace('\\p{N}{1,3}', '\\p{N}');
  j.model.merges = j.model.merges.map((m) => m.split(' '));
  for (const a of j.added_tokens) {
    if (a.content === '<|eot_id|>') a.lstrip = true;
    if (a.content === '<|start_header_id|>') a.rstrip = true;
  }
} else {
  console.error('hf_variant.js: unknown kind ' + kind);
  process.exit(2);
}
fs.writeFileSync(outFile, JSON.stringify(j));
