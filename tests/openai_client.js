// The official npm `openai` client (v4) against a serve-model that tests/test_serve_http.c
// started (test_openai_client): models, completions and chat (plain and streamed, with the
// usage chunk), errors as the client's typed exceptions, tenants' keys (401, 403, another
// tenant's adapter 404), and calls that still work after errors on the client's kept-alive
// connections. Expected texts come from the C test (the engine's greedy output).
//   node openai_client.js SPEC.json   (SPEC: url, keys, models, prompts and expected texts)
// Exit 0 when every check holds, 1 with the failed check on stderr, 77 without the package.
'use strict';
const fs = require('fs');
const path = require('path');

let OpenAI, version;
try {
  OpenAI = require(path.join(process.env.OT_NPM_DIR || '', 'openai'));
  version = require(path.join(process.env.OT_NPM_DIR || '', 'openai', 'package.json')).version;
} catch (e) {
  console.log('the npm package openai is not installed (scripts/setup.sh): ' + e.message);
  process.exit(77);
}

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const client = (key) => new OpenAI({baseURL: spec.url + '/v1', apiKey: key, maxRetries: 0, timeout: 60000});
let checks = 0;

function same(got, want, what) {
  const g = JSON.stringify(got), w = JSON.stringify(want);
  if (g !== w) throw new Error(`${what}: got ${g}, want ${w}`);
  checks++;
}

async function expectError(promise, Type, status, what) {
  try {
    await promise;
  } catch (e) {
    if (!(e instanceof Type)) throw new Error(`${what}: ${e.constructor.name} (${e.message}), want ${Type.name}`);
    same(e.status, status, what + ' status');
    if (!e.error || typeof e.error.message !== 'string') throw new Error(`${what}: no OpenAI error body`);
    return e;
  }
  throw new Error(`${what}: succeeded, want ${Type.name}`);
}

async function main() {
  const acme = client(spec.keys.acme);
  // models: the base and the tenant's adapter, nothing of another tenant's
  const ids = [];
  for await (const m of acme.models.list()) ids.push(m.id);
  same(ids.sort(), [spec.base, spec.adapter].sort(), 'models.list');
  same((await acme.models.retrieve(spec.adapter)).id, spec.adapter, 'models.retrieve');
  await expectError(acme.models.retrieve('no-such-model'), OpenAI.NotFoundError, 404, 'models.retrieve unknown');

  // completions, plain and streamed
  const c = await acme.completions.create({model: spec.adapter, prompt: spec.prompt, max_tokens: spec.max_tokens,
                                           temperature: 0});
  same(c.object, 'text_completion', 'completion object');
  same(c.choices[0].text, spec.completion, 'completion text');
  same(c.usage.completion_tokens, spec.max_tokens, 'completion usage');
  let text = '', finish = null;
  const cs = await acme.completions.create({model: spec.adapter, prompt: spec.prompt, max_tokens: spec.max_tokens,
                                            temperature: 0, stream: true});
  for await (const chunk of cs) {
    text += chunk.choices[0].text;
    if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
  }
  same(text, spec.completion, 'streamed completion');
  same(finish, 'length', 'streamed finish_reason');

  // chat, plain and streamed with the usage chunk
  const messages = [{role: 'system', content: spec.system}, {role: 'user', content: spec.user}];
  const ch = await acme.chat.completions.create({model: spec.adapter, messages, max_tokens: spec.max_tokens,
                                                 temperature: 0});
  same(ch.object, 'chat.completion', 'chat object');
  same(ch.choices[0].message.role, 'assistant', 'chat role');
  same(ch.choices[0].message.content, spec.chat, 'chat content');
  let content = '', role = null, usage = null, after = 0;
  const st = await acme.chat.completions.create({model: spec.adapter, messages, max_tokens: spec.max_tokens,
                                                 temperature: 0, stream: true, stream_options: {include_usage: true}});
  for await (const chunk of st) {
    if (usage) after++;
    if (chunk.usage) usage = chunk.usage;
    if (!chunk.choices.length) continue;
    const d = chunk.choices[0].delta;
    if (d.role) role = d.role;
    if (d.content) content += d.content;
  }
  same(content, spec.chat, 'streamed chat content');
  same(role, 'assistant', 'streamed chat role');
  same(usage && usage.completion_tokens, spec.max_tokens, 'streamed chat usage');
  same(usage.total_tokens, ch.usage.total_tokens, 'streamed chat usage = plain usage');
  same(after, 0, 'nothing after the usage chunk');

  // errors, each followed by a call that works on the same client
  await expectError(acme.completions.create({model: spec.adapter, prompt: 'x', temperature: 5}),
                    OpenAI.BadRequestError, 400, 'temperature 5');
  await expectError(acme.chat.completions.create({model: spec.adapter, messages: []}), OpenAI.BadRequestError, 400,
                    'no messages');
  await expectError(acme.completions.create({model: spec.other_adapter, prompt: 'x'}), OpenAI.NotFoundError, 404,
                    "another tenant's adapter");
  await expectError(acme.chat.completions.create({model: spec.adapter, messages, tools: [{type: 'function',
                    function: {name: 'f', parameters: {}}}]}), OpenAI.BadRequestError, 400, 'tools');
  same((await acme.completions.create({model: spec.base, prompt: 'x', max_tokens: 2})).usage.completion_tokens, 2,
       'a call after the errors');
  await expectError(client('otk-wrong').models.list(), OpenAI.AuthenticationError, 401, 'unknown key');
  await expectError(client(spec.keys.revoked).completions.create({model: spec.base, prompt: 'x'}),
                    OpenAI.PermissionDeniedError, 403, 'revoked key');
  await expectError(acme.completions.create({model: spec.base, prompt: 'x', logit_bias: {'100000': 1}}),
                    OpenAI.BadRequestError, 400, 'logit_bias beyond the vocabulary');
  console.log(`openai ${version}: ${checks} checks passed`);
}

main().catch((e) => {
  console.error('FAILED: ' + e.message);
  process.exit(1);
});
