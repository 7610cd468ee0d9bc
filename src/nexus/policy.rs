//! Policies: who (a SPIFFE-ID pattern) may do what (permissions) where (a path pattern), with
//! SPIKE's semantics (DESIGN.md §4, reference §6.2–6.3), and the policy routes' operations.
//!
//! - Patterns are regular expressions matched anywhere in the string unless anchored
//!   (`^...$`), compiled with a size limit. A pattern without regular-expression syntax is
//!   matched as the plain text it is ([`Pattern`]): `^spiffe://spike\.ist/app/web$` is string
//!   equality, and needs no compiled program. Other patterns are compiled once for the policy
//!   set they belong to, when a request first needs them ([`Rule`]), and only for strings that
//!   hold the text the pattern starts with: `^spiffe://spike\.ist/team-7/[a-z]+$` is not
//!   compiled to be matched against `spiffe://spike.ist/app/web`.
//! - Permissions: `read`, `write`, `list`, `execute`, `super` (everything). A policy grants a
//!   request when both patterns match and it holds every wanted permission (or `super`); there
//!   are no deny rules.
//! - The reserved pseudo-paths `spike/system/acl` (policy management), `spike/system/secret`
//!   (listing) and `spike/system/cipher/exec` (the cipher) are reachable only by a policy whose
//!   path pattern matches them as a whole (`^(?:pattern)$`) and whose SPIFFE-ID pattern is
//!   anchored or a deliberate catch-all. Policies that would reach them by substring accident
//!   are refused at creation and ignored at check time.
//!
//! Every policy lives in the policy book, one sealed store record holding the whole set
//! ([`super::book`]); the operations here change it with compare-and-set and read it through
//! the instance's validated copy.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::ApiError;
use super::authz::Grant;
use super::book::BookKey;
use super::book::Policies;
use crate::identity::SpiffeId;
use crate::protocol::nexus::{self as wire, Policy, PolicyPutRequest};
use crate::protocol::policy::{self as rules, compile, reserved_index, reserved_reach};
pub use crate::protocol::policy::{ACL_PATH, CIPHER_PATH, Permission, SECRET_LIST_PATH};
use crate::store::Store;

/// A policy as stored (inside the sealed policy book).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// The policy's name, its identifier.
    pub name: String,
    /// Regular expression over callers' SPIFFE IDs.
    pub spiffeid_pattern: String,
    /// Regular expression over secret paths.
    pub path_pattern: String,
    /// What it grants.
    pub permissions: Vec<Permission>,
    /// Creation time (Unix nanoseconds).
    pub created: i64,
    /// Last replacement time (Unix nanoseconds).
    pub updated: i64,
}

impl StoredPolicy {
    /// The policy as the API returns it.
    pub fn to_api(&self) -> Policy {
        Policy {
            // SPIKE leaves `id` empty; ours is the name, so a listed policy can be fetched
            // by the `id` it was listed with.
            id: self.name.clone(),
            name: self.name.clone(),
            spiffeid_pattern: self.spiffeid_pattern.clone(),
            path_pattern: self.path_pattern.clone(),
            permissions: self
                .permissions
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
            created_at: wire::rfc3339(self.created),
            updated_at: wire::rfc3339(self.updated),
        }
    }
}

/// Validates a policy from a request ([`rules::validate`]) and returns its stored form (times
/// set by the caller).
pub fn validate(req: &PolicyPutRequest) -> Result<StoredPolicy, ApiError> {
    let permissions = rules::validate(req).map_err(ApiError::BadRequest)?;
    Ok(StoredPolicy {
        name: req.name.clone(),
        spiffeid_pattern: req.spiffeid_pattern.clone(),
        path_pattern: req.path_pattern.clone(),
        permissions,
        created: 0,
        updated: 0,
    })
}

/// Policy management is authorised on the reserved [`ACL_PATH`]: refuses a grant for anything
/// else or for another permission.
fn granted(grant: &Grant, want: Permission) -> Result<(), ApiError> {
    if grant.resource(want)? == ACL_PATH {
        Ok(())
    } else {
        Err(ApiError::Internal(
            "a policy operation needs a grant on the ACL path".into(),
        ))
    }
}

/// Creates or replaces a policy (keeping its creation time).
pub async fn put(
    store: &impl Store,
    policies: &Policies,
    key: &dyn BookKey,
    grant: &Grant,
    req: &PolicyPutRequest,
) -> Result<(), ApiError> {
    granted(grant, Permission::Write)?;
    let policy = validate(req)?;
    policies
        .change(store, key, |set| {
            let now = wire::now_nanos();
            let mut policy = policy.clone();
            policy.updated = now;
            match set.binary_search_by(|p| p.name.as_str().cmp(&policy.name)) {
                Ok(i) => {
                    policy.created = set[i].created;
                    set[i] = policy;
                }
                Err(i) => {
                    policy.created = now;
                    set.insert(i, policy);
                }
            }
            Ok(())
        })
        .await
}

/// One policy (read on the ACL path), from the policy book as the store holds it now.
pub async fn get(
    store: &impl Store,
    policies: &Policies,
    key: &dyn BookKey,
    grant: &Grant,
    name: &str,
) -> Result<StoredPolicy, ApiError> {
    granted(grant, Permission::Read)?;
    rules::validate_name(name).map_err(ApiError::BadRequest)?;
    let book = policies.current(store, key).await?;
    book.get(name)
        .map(|r| r.policy.clone())
        .ok_or(ApiError::NotFound)
}

/// Deletes one policy (write on the ACL path).
pub async fn delete(
    store: &impl Store,
    policies: &Policies,
    key: &dyn BookKey,
    grant: &Grant,
    name: &str,
) -> Result<(), ApiError> {
    granted(grant, Permission::Write)?;
    rules::validate_name(name).map_err(ApiError::BadRequest)?;
    policies
        .change(store, key, |set| {
            let i = set
                .binary_search_by(|p| p.name.as_str().cmp(name))
                .map_err(|_| ApiError::NotFound)?;
            set.remove(i);
            Ok(())
        })
        .await
}

/// Every policy, sorted by name, from the policy book as the store holds it now.
pub async fn all(
    store: &impl Store,
    policies: &Policies,
    key: &dyn BookKey,
    grant: &Grant,
) -> Result<Vec<StoredPolicy>, ApiError> {
    granted(grant, Permission::List)?;
    let book = policies.current(store, key).await?;
    Ok(book.rules().iter().map(|r| r.policy.clone()).collect())
}

/// Whether two policies grant the same: equal patterns and the same set of permissions
/// (names and times aside).
pub fn same_grant(a: &StoredPolicy, b: &StoredPolicy) -> bool {
    let set = |p: &StoredPolicy| {
        let mut v: Vec<&'static str> = p.permissions.iter().map(|x| x.as_str()).collect();
        v.sort_unstable();
        v
    };
    a.spiffeid_pattern == b.spiffeid_pattern && a.path_pattern == b.path_pattern && set(a) == set(b)
}

/// What [`import`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyImport {
    /// Policies added, and policies already there with the same grant.
    Done {
        /// Added to the book.
        written: usize,
        /// Already in the book, granting the same.
        same: usize,
    },
    /// Names the book holds with another grant; nothing was written.
    Conflicts(Vec<String>),
}

/// Adds `imported` (validated with [`validate`], times as they should be kept) to the policy
/// book in one change, or nothing: a name the book holds with the same grant is skipped, one
/// it holds with another grant is a conflict and nothing is written. With nothing to add,
/// nothing is written either (`dry_run`: never).
pub async fn import(
    store: &impl Store,
    policies: &Policies,
    key: &dyn BookKey,
    imported: &[StoredPolicy],
    dry_run: bool,
) -> Result<PolicyImport, ApiError> {
    // What the book holds now decides; the change below decides again on the book it writes.
    let sort = |set: &[StoredPolicy]| -> (Vec<StoredPolicy>, usize, Vec<String>) {
        let (mut new, mut same, mut conflicts) = (Vec::new(), 0, Vec::new());
        for p in imported {
            match set.binary_search_by(|q| q.name.as_str().cmp(&p.name)) {
                Ok(i) if same_grant(&set[i], p) => same += 1,
                Ok(_) => conflicts.push(p.name.clone()),
                Err(_) => new.push(p.clone()),
            }
        }
        (new, same, conflicts)
    };
    let book = policies.current(store, key).await?;
    let held: Vec<StoredPolicy> = book.rules().iter().map(|r| r.policy.clone()).collect();
    let (new, same, conflicts) = sort(&held);
    if !conflicts.is_empty() {
        return Ok(PolicyImport::Conflicts(conflicts));
    }
    if new.is_empty() || dry_run {
        return Ok(PolicyImport::Done {
            written: new.len(),
            same,
        });
    }
    let mut outcome = PolicyImport::Done { written: 0, same };
    let changed = policies
        .change(store, key, |set| {
            let (new, same, conflicts) = sort(set);
            if !conflicts.is_empty() {
                outcome = PolicyImport::Conflicts(conflicts);
                return Err(ApiError::BadRequest("conflicting policies".into()));
            }
            outcome = PolicyImport::Done {
                written: new.len(),
                same,
            };
            set.extend(new);
            set.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(())
        })
        .await;
    match (changed, &outcome) {
        (Ok(()), _) | (Err(_), PolicyImport::Conflicts(_)) => Ok(outcome),
        (Err(e), _) => Err(e),
    }
}

/// Does a policy hold every permission in `want`?
pub fn grants(permissions: &[Permission], want: &[Permission]) -> bool {
    permissions.contains(&Permission::Super) || want.iter().all(|w| permissions.contains(w))
}

/// A pattern as it is matched. Patterns without regular-expression syntax are plain text with
/// optional anchors and are matched as such; the rest are compiled when first needed.
#[derive(Debug)]
pub enum Pattern {
    /// `^text$`: the whole string.
    Exact(String),
    /// `^text`: a prefix.
    Prefix(String),
    /// `text$`: a suffix.
    Suffix(String),
    /// `text`: anywhere.
    Contains(String),
    /// Anything else: compiled on first use (`None` if it does not compile: matches nothing),
    /// and tried only on strings that hold its [`Required`] text.
    Regex(String, Option<Required>, OnceLock<Option<Regex>>),
}

/// Text every match of a pattern holds: at the start (the pattern is anchored there), or
/// anywhere.
#[derive(Debug, PartialEq, Eq)]
pub struct Required {
    /// Whether the text is where every match starts.
    pub at_start: bool,
    /// The text itself.
    pub text: String,
}

impl Required {
    /// Whether `text` holds the required text where a match would need it.
    fn holds(&self, text: &str) -> bool {
        if self.at_start {
            text.starts_with(self.text.as_str())
        } else {
            text.contains(self.text.as_str())
        }
    }
}

impl Pattern {
    /// The matcher for `pattern`: a plain comparison when the pattern is a literal (anchored
    /// or not), a lazily compiled regular expression otherwise.
    pub fn new(pattern: &str) -> Pattern {
        match literal(pattern) {
            Some((true, text, true)) => Pattern::Exact(text),
            Some((true, text, false)) => Pattern::Prefix(text),
            Some((false, text, true)) => Pattern::Suffix(text),
            Some((false, text, false)) => Pattern::Contains(text),
            None => Pattern::Regex(pattern.to_string(), required(pattern), OnceLock::new()),
        }
    }

    /// Whether `text` matches, with SPIKE's semantics (anywhere unless anchored).
    pub fn is_match(&self, text: &str) -> bool {
        match self {
            Pattern::Exact(t) => text == t,
            Pattern::Prefix(t) => text.starts_with(t.as_str()),
            Pattern::Suffix(t) => text.ends_with(t.as_str()),
            Pattern::Contains(t) => text.contains(t.as_str()),
            Pattern::Regex(_, Some(required), _) if !required.holds(text) => false,
            Pattern::Regex(source, _, re) => re
                .get_or_init(|| compile(source).ok())
                .as_ref()
                .is_some_and(|re| re.is_match(text)),
        }
    }

    /// The one string this pattern matches, if it matches exactly one.
    pub fn exact(&self) -> Option<&str> {
        match self {
            Pattern::Exact(t) => Some(t),
            _ => None,
        }
    }
}

/// The characters that mean themselves when escaped with `\` (regex's metacharacters).
const META: &str = "\\.+*?()|[]{}^$#&-~";

/// Splits a pattern that is plain text into (anchored at the start, the text, anchored at the
/// end); `None` if it uses any other regular-expression syntax. An escaped metacharacter
/// (`\.`) is that character; other escapes (`\d`, `\/`) are left to the regex engine.
fn literal(pattern: &str) -> Option<(bool, String, bool)> {
    let (start, body) = match pattern.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let mut text = String::with_capacity(body.len());
    let mut end = false;
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) if META.contains(escaped) => text.push(escaped),
                _ => return None,
            },
            '$' if chars.as_str().is_empty() => end = true,
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => {
                return None;
            }
            // `#`, `&`, `-` and `~` are literal outside a class and without the `x` flag,
            // which needs `(?x)` and so a parenthesis.
            c => text.push(c),
        }
    }
    Some((start, text, end))
}

/// The text a pattern's every match holds: its leading plain text (escaped metacharacters as
/// themselves), up to the first other syntax, less a last character that a quantifier may make
/// optional (`ab?` requires `a`). `None` for patterns with an alternation anywhere, or without
/// leading plain text.
fn required(pattern: &str) -> Option<Required> {
    if pattern.contains('|') {
        return None;
    }
    let (at_start, body) = match pattern.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let mut text = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        let c = match c {
            '\\' => match chars.next() {
                Some(escaped) if META.contains(escaped) => escaped,
                _ => break,
            },
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => break,
            c => c,
        };
        if matches!(chars.peek(), Some('?' | '*' | '{')) {
            break;
        }
        text.push(c);
    }
    (!text.is_empty()).then_some(Required { at_start, text })
}

/// A policy ready to be checked: its patterns as matchers, compiled lazily, and which
/// reserved pseudo-paths it may reach, worked out when first asked. Lives in one decoded policy
/// book and moves to the next one while the policy is unchanged.
#[derive(Debug)]
pub struct Rule {
    /// The policy as stored.
    pub policy: StoredPolicy,
    id: Pattern,
    path: Pattern,
    reserved: OnceLock<[bool; 3]>,
}

impl Rule {
    /// The rule of `policy`; nothing is compiled until it is first checked.
    pub fn new(policy: StoredPolicy) -> Rule {
        Rule {
            id: Pattern::new(&policy.spiffeid_pattern),
            path: Pattern::new(&policy.path_pattern),
            reserved: OnceLock::new(),
            policy,
        }
    }

    /// The SPIFFE-ID pattern's matcher.
    pub fn id_pattern(&self) -> &Pattern {
        &self.id
    }

    /// Does the SPIFFE-ID pattern name `caller`?
    pub fn names(&self, caller: &SpiffeId) -> bool {
        self.id.is_match(caller.as_str())
    }

    /// Does this policy hold every permission in `want`?
    pub fn grants(&self, want: &[Permission]) -> bool {
        grants(&self.policy.permissions, want)
    }

    /// Does the path pattern reach `path` (the reserved-path rule included)? The SPIFFE-ID
    /// pattern is checked separately ([`Rule::names`]).
    pub fn reaches(&self, path: &str) -> bool {
        match reserved_index(path) {
            Some(i) => self.reserved.get_or_init(|| {
                reserved_reach(&self.policy.spiffeid_pattern, &self.policy.path_pattern)
            })[i],
            None => self.path.is_match(path),
        }
    }

    /// The whole check: `caller` may do `want` on `path` under this policy.
    pub fn allows(&self, caller: &SpiffeId, path: &str, want: &[Permission]) -> bool {
        self.names(caller) && self.grants(want) && self.reaches(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, path: &str, perms: &[&str]) -> PolicyPutRequest {
        PolicyPutRequest {
            name: "p".into(),
            spiffeid_pattern: id.into(),
            path_pattern: path.into(),
            permissions: perms.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn rule(r: PolicyPutRequest) -> Rule {
        Rule::new(validate(&r).unwrap())
    }

    #[test]
    fn substring_semantics_unless_anchored() {
        let p = rule(req("spiffe://spike.ist/web", "secrets/web", &["read"]));
        let web = id("spiffe://spike.ist/web");
        assert!(p.allows(&web, "secrets/web/db", &[Permission::Read]));
        assert!(p.allows(&web, "x/secrets/web", &[Permission::Read]));
        assert!(!p.allows(&web, "secrets/web/db", &[Permission::Write]));
        assert!(p.allows(
            &id("spiffe://spike.ist/webby"),
            "secrets/web",
            &[Permission::Read]
        ));
        let anchored = rule(req(
            "^spiffe://spike.ist/web$",
            "^secrets/web/[^/]+$",
            &["read", "write"],
        ));
        assert!(anchored.allows(
            &web,
            "secrets/web/db",
            &[Permission::Read, Permission::Write]
        ));
        assert!(!anchored.allows(&web, "secrets/web/db/x", &[Permission::Read]));
        assert!(!anchored.allows(
            &id("spiffe://spike.ist/webby"),
            "secrets/web/db",
            &[Permission::Read]
        ));
        let sup = rule(req("^spiffe://spike.ist/admin$", ".*", &["super"]));
        assert!(sup.allows(
            &id("spiffe://spike.ist/admin"),
            "anything",
            &[Permission::Write, Permission::List]
        ));
    }

    #[test]
    fn reserved_paths_need_whole_match_and_an_anchored_id() {
        // Substring accidents are refused at creation...
        for (i, p) in [
            ("spiffe://spike.ist/w", "acl"),
            ("spiffe://spike.ist/w", "system"),
            ("^spiffe://spike.ist/w$", "spike"),
            ("spiffe://spike.ist/w", ".*"),
        ] {
            let err = validate(&req(i, p, &["write"])).unwrap_err().to_string();
            assert!(err.contains("reserved path"), "{i} {p}: {err}");
        }
        // ...deliberate grants are allowed.
        let ok = rule(req(
            "^spiffe://spike.ist/ops$",
            "^spike/system/acl$",
            &["write"],
        ));
        let ops = id("spiffe://spike.ist/ops");
        assert!(ok.allows(&ops, ACL_PATH, &[Permission::Write]));
        assert!(!ok.allows(&ops, SECRET_LIST_PATH, &[Permission::Write]));
        let all = rule(req("spiffe://.*", ".*", &["list"]));
        assert!(all.allows(
            &id("spiffe://spike.ist/x"),
            SECRET_LIST_PATH,
            &[Permission::List]
        ));
        // A stored policy that slipped through (written by an older version) is ignored for
        // reserved paths.
        let sneaky = Rule::new(StoredPolicy {
            name: "s".into(),
            spiffeid_pattern: "spiffe://spike.ist/w".into(),
            path_pattern: "acl".into(),
            permissions: vec![Permission::Super],
            created: 0,
            updated: 0,
        });
        let w = id("spiffe://spike.ist/w");
        assert!(sneaky.allows(&w, "x/acl", &[Permission::Write]));
        assert!(!sneaky.allows(&w, ACL_PATH, &[Permission::Write]));
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        let cases = [
            req("spiffe://spike.ist/(", "x", &["read"]),
            req("spiffe://spike.ist/w", "a(", &["read"]),
            req("http://x", "x", &["read"]),
            req("spiffe://spike.ist/w", "x", &[]),
            req("spiffe://spike.ist/w", "x", &["admin"]),
            req("spiffe://spike.ist/w", "a b", &["read"]),
            req("spiffe://spike.ist/w", "(a{1000}){1000}", &["read"]),
        ];
        for r in cases {
            let e = validate(&r).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{r:?}");
        }
        let mut r = req("spiffe://spike.ist/w", "x", &["read"]);
        r.name = "bad/name".into();
        assert!(validate(&r).is_err());
    }

    /// Plain-text patterns are matched without a regex, and exactly as the regex would.
    #[test]
    fn plain_text_patterns_match_as_their_regex_does() {
        let cases = [
            ("^spiffe://spike\\.ist/app/web$", true),
            ("^spiffe://spike\\.ist/app/", true),
            ("/app/web$", true),
            ("spiffe://spike\\.ist/app", true),
            ("secrets/web-1_a", true),
            ("^$", true),
            ("", true),
            ("^spiffe://spike.ist/app/web$", false),
            ("^spiffe://spike\\.ist/app/w+$", false),
            ("^a\\d$", false),
            ("^a\\/b$", false),
            ("a|b", false),
            ("^a$b", false),
            ("a^", false),
            ("a\\$", true),
            ("(?i)a", false),
        ];
        let texts = [
            "spiffe://spike.ist/app/web",
            "spiffe://spike.ist/app/webby",
            "spiffe://spikeXist/app/web",
            "x/spiffe://spike.ist/app/web",
            "secrets/web-1_a/db",
            "",
            "a$",
            "a",
            "a/b",
        ];
        for (pattern, plain) in cases {
            let p = Pattern::new(pattern);
            assert_eq!(!matches!(p, Pattern::Regex(..)), plain, "{pattern}: {p:?}");
            let re = compile(pattern).unwrap();
            for t in texts {
                assert_eq!(p.is_match(t), re.is_match(t), "{pattern} on {t:?}");
            }
        }
        assert_eq!(
            Pattern::new("^spiffe://spike\\.ist/app/web$").exact(),
            Some("spiffe://spike.ist/app/web")
        );
    }

    /// A regex is tried only on strings holding the text it starts with, with the same answers.
    #[test]
    fn a_regex_is_compiled_only_for_strings_it_may_match() {
        let cases = [
            (
                "^spiffe://spike\\.ist/team-7/[a-z]+$",
                Some((true, "spiffe://spike.ist/team-7/")),
            ),
            (
                "spiffe://spike\\.ist/app/.*",
                Some((false, "spiffe://spike.ist/app/")),
            ),
            ("^spiffe://spike.ist/app", Some((true, "spiffe://spike"))),
            ("^ab?c.", Some((true, "a"))),
            ("^ab*c.", Some((true, "a"))),
            ("^ab{0,2}.", Some((true, "a"))),
            ("^ab+.", Some((true, "ab"))),
            ("^a\\.b\\d", Some((true, "a.b"))),
            ("^a(?i)b.", Some((true, "a"))),
            ("(?i)abc.", None),
            ("^abc.|x", None),
            ("^(abc).", None),
            ("^a?b.", None),
            (".*", None),
        ];
        let texts = [
            "spiffe://spike.ist/team-7/web",
            "spiffe://spike.ist/team-7/",
            "spiffe://spike.ist/team-8/web",
            "x/spiffe://spike.ist/app/web",
            "spiffe://spikeXist/app",
            "ac!",
            "abbc!",
            "ab!",
            "a.b1",
            "aB!",
            "ABC!",
            "x",
            "b!",
        ];
        for (pattern, want) in cases {
            let p = Pattern::new(pattern);
            let Pattern::Regex(_, required, _) = &p else {
                panic!("{pattern} is plain text");
            };
            let want = want.map(|(at_start, text)| Required {
                at_start,
                text: text.into(),
            });
            assert_eq!(required, &want, "{pattern}");
            let re = compile(pattern).unwrap();
            for t in texts {
                assert_eq!(p.is_match(t), re.is_match(t), "{pattern} on {t:?}");
            }
            if required.is_some() {
                let fresh = Pattern::new(pattern);
                assert!(!fresh.is_match("nothing alike"));
                let Pattern::Regex(_, _, compiled) = &fresh else {
                    unreachable!()
                };
                assert!(compiled.get().is_none(), "{pattern} compiled");
            }
        }
    }

    fn stored(name: &str, path: &str, perms: &[Permission]) -> StoredPolicy {
        StoredPolicy {
            name: name.into(),
            spiffeid_pattern: "^spiffe://spike\\.ist/w$".into(),
            path_pattern: path.into(),
            permissions: perms.to_vec(),
            created: 7,
            updated: 8,
        }
    }

    #[tokio::test]
    async fn an_import_adds_policies_in_one_change_or_names_the_conflicts() {
        use crate::store::{Namespace, Store as _};
        let store = crate::store::memory::MemoryStore::default();
        let key = crate::crypto::RootKey::generate()
            .unwrap()
            .derive("spike/policies/v1");
        let book = Policies::default();
        let set = vec![
            stored("a", "^x/", &[Permission::Read, Permission::List]),
            stored("b", "^y/", &[Permission::Write]),
        ];
        // A dry run writes nothing.
        let dry = import(&store, &book, &key, &set, true).await.unwrap();
        assert_eq!(
            dry,
            PolicyImport::Done {
                written: 2,
                same: 0
            }
        );
        let revision = || async {
            store
                .revision(Namespace::System, super::super::book::BOOK_KEY)
                .await
                .unwrap()
        };
        let empty = revision().await;
        assert_eq!(book.current(&store, &key).await.unwrap().rules().len(), 0);
        assert_eq!(
            import(&store, &book, &key, &set, false).await.unwrap(),
            PolicyImport::Done {
                written: 2,
                same: 0
            }
        );
        let after = revision().await;
        assert_ne!(after, empty);
        let held = book.current(&store, &key).await.unwrap();
        assert_eq!(held.get("a").unwrap().policy, set[0]);
        // Again, permissions in another order: the same grant, nothing written.
        let again = vec![
            stored("a", "^x/", &[Permission::List, Permission::Read]),
            set[1].clone(),
        ];
        assert_eq!(
            import(&store, &book, &key, &again, false).await.unwrap(),
            PolicyImport::Done {
                written: 0,
                same: 2
            }
        );
        assert_eq!(revision().await, after);
        // Another grant under a held name: named, and nothing written, not even the new one.
        let conflicting = vec![
            stored("a", "^z/", &[Permission::Read]),
            stored("c", "^c/", &[Permission::Read]),
        ];
        assert_eq!(
            import(&store, &book, &key, &conflicting, false)
                .await
                .unwrap(),
            PolicyImport::Conflicts(vec!["a".into()])
        );
        assert_eq!(revision().await, after);
    }
}
