// A real OpenID provider for tests/jwt.rs: oidc-provider (pinned in package.json) behind a
// node https server with the test's certificate, issuing JWT access tokens with the
// client-credentials grant (resource indicators, accessTokenFormat 'jwt', audience "chat").
//
// Usage: node oidc.mjs CERT_PEM KEY_PEM CA_PEM
// Prints "issuer https://127.0.0.1:PORT" then "admin PORT" on stdout. The admin port is
// plain HTTP on 127.0.0.1, for the test only:
//   GET /token?scope=chat&ttl=60   an access token from the provider's own token endpoint
//   GET /rotate                    a new signing key (first), the old one kept in the JWKS
//   GET /rotate?retire=1           a new signing key, the old ones dropped from the JWKS
//   GET /fetches                   how many times the JWKS was served
//   GET /sign?claims=JSON&alg=RS256&kid=K   a token with these claims signed with the current
//                                  key (alg=HS256: the algorithm-confusion forgery, an HMAC
//                                  keyed with the published RSA public key in PEM)
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const [certFile, keyFile, caFile] = process.argv.slice(2);
const cert = fs.readFileSync(certFile);
const key = fs.readFileSync(keyFile);
const ca = fs.readFileSync(caFile);

const CLIENT_ID = 'framegate-test';
const CLIENT_SECRET = 'a-client-secret-long-enough-for-the-test';
const RESOURCE = 'urn:framegate:chat';

let keyNumber = 0;
function signingKey() {
  keyNumber += 1;
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: `key-${keyNumber}`, alg: 'RS256', use: 'sig' };
}

let keys = [signingKey()];
let ttl = 60;
let fetches = 0;
let provider;
let issuer;

function makeProvider() {
  provider = new Provider(issuer, {
    clients: [{
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: 'chat other',
    }],
    jwks: { keys },
    scopes: ['chat', 'other'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'chat other',
          audience: 'chat',
          accessTokenTTL: ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
}

const server = https.createServer({ cert, key }, (req, res) => {
  if (req.url.startsWith('/jwks')) fetches += 1;
  provider.callback()(req, res);
});

function token(scope) {
  const body = new URLSearchParams({ grant_type: 'client_credentials', scope, resource: RESOURCE }).toString();
  const auth = Buffer.from(`${CLIENT_ID}:${CLIENT_SECRET}`).toString('base64');
  return new Promise((resolve, reject) => {
    const req = https.request(`${issuer}/token`, {
      method: 'POST',
      ca,
      headers: {
        'content-type': 'application/x-www-form-urlencoded',
        authorization: `Basic ${auth}`,
        'content-length': Buffer.byteLength(body),
      },
    }, (res) => {
      let data = '';
      res.on('data', (c) => { data += c; });
      res.on('end', () => {
        const parsed = JSON.parse(data);
        if (!parsed.access_token) reject(new Error(data));
        else resolve(parsed.access_token);
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

const admin = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  try {
    let answer;
    if (url.pathname === '/token') {
      ttl = Number(url.searchParams.get('ttl') || 60);
      answer = await token(url.searchParams.get('scope') || 'chat');
    } else if (url.pathname === '/rotate') {
      keys = url.searchParams.get('retire') ? [signingKey()] : [signingKey(), ...keys];
      makeProvider();
      answer = keys[0].kid;
    } else if (url.pathname === '/sign') {
      const alg = url.searchParams.get('alg') || 'RS256';
      const kid = url.searchParams.get('kid') || keys[0].kid;
      const b64 = (text) => Buffer.from(text).toString('base64url');
      const input = `${b64(JSON.stringify({ alg, typ: 'at+jwt', kid }))}.${b64(url.searchParams.get('claims'))}`;
      let signature;
      if (alg === 'HS256') {
        const pem = crypto.createPublicKey({ key: keys[0], format: 'jwk' }).export({ type: 'spki', format: 'pem' });
        signature = crypto.createHmac('sha256', pem).update(input).digest();
      } else {
        signature = crypto.sign('sha256', Buffer.from(input), crypto.createPrivateKey({ key: keys[0], format: 'jwk' }));
      }
      answer = `${input}.${signature.toString('base64url')}`;
    } else if (url.pathname === '/fetches') {
      answer = String(fetches);
    } else {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(answer) });
    res.end(answer);
  } catch (e) {
    const text = String(e);
    res.writeHead(500, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }
});

server.listen(0, '127.0.0.1', () => {
  issuer = `https://127.0.0.1:${server.address().port}`;
  makeProvider();
  admin.listen(0, '127.0.0.1', () => {
    console.log(`issuer ${issuer}`);
    console.log(`admin ${admin.address().port}`);
  });
});
