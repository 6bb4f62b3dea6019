//! "Each new token revokes the client's earlier ones": a policy some authorization servers
//! apply to the client credentials and JWT bearer grants, e.g. Doorkeeper's
//! `revoke_previous_client_credentials_token` option ("Doorkeeper: Configuration"), or servers
//! that allow one live token per client. Two clients sharing one set of credentials then
//! revoke each other's tokens with every request they make for a new one.

use std::collections::HashMap;

use super::registry::IssuedToken;

/// Revokes every token in `tokens` that `fresh` supersedes under this policy: not yet revoked,
/// from the same issuer, for the same client and subject. Returns how many.
pub(crate) fn revoke_superseded(
    tokens: &mut HashMap<String, IssuedToken>,
    fresh: &IssuedToken,
) -> usize {
    let mut count = 0;
    for t in tokens.values_mut().filter(|t| {
        !t.revoked
            && t.issuer == fresh.issuer
            && t.client_id == fresh.client_id
            && t.subject == fresh.subject
    }) {
        t.revoked = true;
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::registry::TokenRegistry;

    #[test]
    fn a_new_token_revokes_the_same_clients_earlier_ones_only() {
        let registry = TokenRegistry::new();
        registry.set_revoke_previous(true);
        let first = registry.issue_for_test("client-1", "sub-1", Duration::from_secs(60));
        let other = registry.issue_for_test("client-2", "sub-1", Duration::from_secs(60));
        assert!(registry.validate(&first).is_ok());
        let second = registry.issue_for_test("client-1", "sub-1", Duration::from_secs(60));
        assert!(registry.validate(&first).is_err(), "superseded");
        assert!(registry.validate(&second).is_ok());
        assert!(
            registry.validate(&other).is_ok(),
            "another client's token stays"
        );
        assert_eq!(registry.revoked_by_policy(), 1);
        registry.set_revoke_previous(false);
        let third = registry.issue_for_test("client-1", "sub-1", Duration::from_secs(60));
        assert!(
            registry.validate(&second).is_ok(),
            "policy off: earlier tokens stay"
        );
        assert!(registry.validate(&third).is_ok());
    }
}
