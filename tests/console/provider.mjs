// A real OpenID provider for the approver-console test (issue 13): panva's
// `oidc-provider` from the npm registry, with one confidential client (the
// broker's console) and two people. Its development login page takes any
// password; the account id typed in picks the person.
//
//   node provider.mjs <port> <redirect_uri> <client_secret>
//
// Prints "ready <issuer>" once it listens on 127.0.0.1:<port>.
import { createRequire } from "node:module";
import path from "node:path";

// oidc-provider lives in $PORTCULLIS_TEST_OIDC_DIR/node_modules (installed
// by .ci/browser), not next to this file.
const require = createRequire(path.join(process.env.PORTCULLIS_TEST_OIDC_DIR, "noop.js"));
const { default: Provider } = await import(require.resolve("oidc-provider"));

const [port, redirectUri, clientSecret] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;

const people = {
  alice: { sub: "alice", email: "alice@example.org", email_verified: true, name: "Alice" },
  bob: { sub: "bob", email: "bob@example.org", email_verified: true, name: "Bob" },
};

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: "portcullis-console",
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_basic",
    },
  ],
  claims: { openid: ["sub"], email: ["email", "email_verified"], profile: ["name"] },
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ["portcullis-test-only-cookie-key"] },
  async findAccount(_ctx, id) {
    const claims = people[id];
    return claims && { accountId: id, claims: async () => claims };
  },
  // Consent is the provider's business, not the console's: grant the
  // requested scopes at once so the test sees only the login page.
  async loadExistingGrant(ctx) {
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope("openid email profile");
    await grant.save();
    return grant;
  },
});

provider.listen(Number(port), "127.0.0.1", () => {
  console.log(`ready ${issuer}`);
});
