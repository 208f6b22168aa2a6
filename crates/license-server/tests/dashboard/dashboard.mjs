// Drives Debian's chromium (playwright-core, no browser download) through the dashboard of a
// real license-server. Run by crates/license-server/tests/dashboard.rs, which starts the server,
// enrolls a machine, passes everything in the environment and checks the server side after.
// Any failed expectation throws: the process exits non-zero and the Rust test fails.
// Prints one JSON line on stdout with what the Rust side checks next.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import path from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env('DASHBOARD_URL'); // https://localhost:PORT
const adminToken = env('ADMIN_TOKEN');
const readonlyToken = env('READONLY_TOKEN');
const machineId = env('MACHINE_ID');
const clientName = env('CLIENT_NAME');
const serial = env('CERT_SERIAL');
const shots = env('SCREENSHOT_DIR');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const out = {};
const shot = (page, name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
const text = async (page, selector) => (await page.locator(selector).first().textContent()).trim();

async function signIn(context, token) {
  const page = await context.newPage();
  const first = await page.goto(`${base}/dashboard`);
  assert.equal(first.status(), 200);
  assert.ok(page.url().endsWith('/dashboard/sign-in'), `not redirected to sign-in: ${page.url()}`);
  await page.fill('#token', token);
  await Promise.all([page.waitForURL(`${base}/dashboard`), page.click('#sign-in')]);
  return page;
}

try {
  // --- admin session -----------------------------------------------------------------------
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });
  {
    const page = await context.newPage();
    await page.goto(`${base}/dashboard/sign-in`);
    await shot(page, '01-sign-in');
    await page.fill('#token', 'lat_not-a-token');
    const [answer] = await Promise.all([page.waitForResponse((r) => r.url().endsWith('/dashboard/sign-in') && r.request().method() === 'POST'), page.click('#sign-in')]);
    assert.equal(answer.status(), 401);
    assert.match(await text(page, '#message'), /Unknown or revoked/);
    await page.close();
  }
  const page = await signIn(context, adminToken);
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === '__Host-lsa_dashboard');
  assert.ok(session, 'no session cookie');
  assert.equal(session.httpOnly, true);
  assert.equal(session.secure, true);
  assert.equal(session.sameSite, 'Strict');
  assert.equal(await page.evaluate(() => document.cookie), '', 'the session cookie is visible to scripts');

  // Overview: the enrolled machine was seen, reported two failed rotations and a rollback.
  assert.equal(await text(page, '#who'), 'ops (admin)');
  assert.equal(await text(page, '#seen-hour'), '1');
  assert.equal(await text(page, '#rotation-failing'), '1');
  assert.equal(await text(page, '#clock-rollbacks'), '1');
  assert.equal(await text(page, '#revoked'), '0');
  assert.match(await text(page, '#troubled'), /pos-test/);
  out.overview = { seen_hour: await text(page, '#seen-hour'), rollbacks: await text(page, '#clock-rollbacks') };
  await shot(page, '02-overview');

  // Clients → the client → its machine.
  await page.click('nav >> text=Clients');
  await page.waitForURL(`${base}/dashboard/clients`);
  await shot(page, '03-clients');
  await page.click(`#clients >> text=${clientName}`);
  await page.waitForURL(/\/dashboard\/clients\/[0-9a-f-]{36}$/);
  await shot(page, '04-client');
  await page.click(`a[href="/dashboard/machines/${machineId}"]`);
  await page.waitForURL(`${base}/dashboard/machines/${machineId}`);
  assert.equal(await text(page, '#machine-id'), machineId);
  assert.equal(await text(page, '#machine-state'), 'enrolled');
  const certRow = page.locator('#certificates tbody tr', { hasText: serial });
  assert.equal(await certRow.count(), 1, 'the certificate is not listed');
  assert.match(await certRow.textContent(), /active/);
  assert.match(await text(page, '#health-summary'), /rotation_failures=2/);
  await shot(page, '05-machine');

  // Issue a license.
  await page.fill('#features', 'pos.sale, pos.refund');
  await page.fill('#expires-in-days', '30');
  await Promise.all([page.waitForURL(/done=license\.issue/), page.click('#issue-license')]);
  assert.match(await text(page, '#licenses'), /pos\.sale, pos\.refund/);
  assert.match(await text(page, '#licenses tbody tr'), /active/);

  // A forged POST (same session cookie, no CSRF token) is refused, and so is a wrong token.
  const forged = await page.request.post(`${base}/dashboard/machines/${machineId}/revoke`, { form: { reason: 'forged' } });
  assert.equal(forged.status(), 403, 'a POST without the CSRF token was not refused');
  const wrong = await page.request.post(`${base}/dashboard/machines/${machineId}/revoke`, { form: { csrf: 'A'.repeat(43) } });
  assert.equal(wrong.status(), 403, 'a POST with a wrong CSRF token was not refused');
  await page.reload();
  assert.equal(await text(page, '#machine-state'), 'enrolled', 'a forged POST revoked the machine');
  out.forged_status = forged.status();

  // Revoke the machine.
  await Promise.all([page.waitForURL(/done=machine\.revoke/), page.click('#revoke-machine')]);
  assert.equal(await text(page, '#machine-state'), 'revoked');
  assert.match(await text(page, '#machine-audit'), /machine\.revoke/);
  assert.match(await text(page, '#machine-audit'), /api:ops/);
  await shot(page, '06-machine-revoked');

  // Install token: created, shown once with its one-liner.
  await page.click('nav >> text=Install tokens');
  await page.waitForURL(`${base}/dashboard/install-tokens`);
  await page.selectOption('#token-client', { label: clientName });
  await Promise.all([page.waitForResponse((r) => r.url().endsWith('/dashboard/install-tokens') && r.request().method() === 'POST'), page.click('#create-token')]);
  const command = await text(page, '#install-command');
  const token = await text(page, '#token-value');
  assert.match(token, /^lit_/);
  assert.ok(command.includes('/install.sh | sudo bash -s -- ' + token), command);
  out.install_command = command;
  out.install_token = token;
  await shot(page, '07-install-token');
  await page.goto(`${base}/dashboard/install-tokens`);
  assert.equal(await page.locator('#created-token').count(), 0, 'the token is shown again');
  assert.ok(!(await page.content()).includes(token), 'the token is shown again');

  // The audit trail, filtered by actor and event.
  await page.click('nav >> text=Audit trail');
  await page.fill('#actor', 'api:ops');
  await page.fill('#action', 'machine.revoke');
  await Promise.all([page.waitForURL(/action=machine\.revoke/), page.click('#filter')]);
  const rows = page.locator('#audit tbody tr');
  assert.equal(await rows.count(), 1);
  assert.match(await rows.first().textContent(), new RegExp(machineId));
  await shot(page, '08-audit');

  // Overview after: one revoked machine.
  await page.click('nav >> text=Overview');
  assert.equal(await text(page, '#revoked'), '1');

  // Sign out: the session is gone.
  await Promise.all([page.waitForURL(/sign-in\?out=1/), page.click('#sign-out')]);
  await page.goto(`${base}/dashboard`);
  assert.ok(page.url().endsWith('/dashboard/sign-in'), 'still signed in after signing out');
  await context.close();

  // --- readonly session --------------------------------------------------------------------
  const ro = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });
  const view = await signIn(ro, readonlyToken);
  assert.equal(await text(view, '#who'), 'viewer (readonly)');
  assert.equal(await view.locator('#purge-certificates').count(), 0);
  await view.goto(`${base}/dashboard/machines/${machineId}`);
  // Every page shows no action form: the only POST form is signing out.
  for (const where of [`/dashboard/machines/${machineId}`, '/dashboard', '/dashboard/clients', '/dashboard/install-tokens']) {
    await view.goto(`${base}${where}`);
    const posts = await view.locator('form[method="post"]').count();
    assert.equal(posts, 1, `${where} shows an action to a readonly session`);
    assert.equal(await view.locator('form[method="post"] button').first().textContent(), 'Sign out');
  }
  await view.goto(`${base}/dashboard/machines/${machineId}`);
  assert.match(await text(view, '#certificates'), new RegExp(serial));
  await shot(view, '09-machine-readonly');
  // Even with its own valid CSRF token, an action is refused.
  const csrf = await view.locator('input[name="csrf"]').first().getAttribute('value');
  const refused = await view.request.post(`${base}/dashboard/machines/${machineId}/restore`, { form: { csrf } });
  assert.equal(refused.status(), 403, 'a readonly session acted');
  out.readonly_status = refused.status();
  await ro.close();
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
