#!/usr/bin/env node
// NFC of each input text by Node (String.prototype.normalize, as transformers.js's NFC
// normalizer does). Usage: node nfc.js INPUT OUTPUT; both files are records of a u32
// little-endian byte length and UTF-8 text.
'use strict';
const fs = require('fs');
const [inFile, outFile] = process.argv.slice(2);
const input = fs.readFileSync(inFile), parts = [];
for (let p = 0; p < input.length;) {
  const len = input.readUInt32LE(p);
  const text = Buffer.from(input.toString('utf8', p + 4, p + 4 + len).normalize('NFC'), 'utf8');
  const head = Buffer.alloc(4);
  head.writeUInt32LE(text.length, 0);
  parts.push(head, text);
  p += 4 + len;
}
fs.writeFileSync(outFile, Buffer.concat(parts));
