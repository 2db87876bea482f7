//! Countries, as consents, the directory and the nationality field name them: ISO 3166-1
//! alpha-2 codes. What a node's users newly enter must be a code ISO has assigned, or XK
//! (Kosovo), which ISO leaves to users but international organisations use: a typo such
//! as CB for Cambodia must be refused, not recorded as a country that excludes no one.
//! What was stored, signed or sent by a version that checked only the form (two capital
//! letters) is read by its form, so that it is never refused for good.

/// The assigned ISO 3166-1 alpha-2 codes (249), and XK, in order.
const CODES: [&str; 250] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "XK", "YE", "YT", "ZA", "ZM", "ZW",
];

/// Whether `text` is a country code: assigned by ISO 3166-1 alpha-2 (or XK), in capitals.
pub fn is_country_code(text: &str) -> bool {
    CODES.binary_search(&text).is_ok()
}

/// Whether `text` has the form of a country code, two capital letters, assigned or not:
/// for what a peer sends, which an older version may have let through unchecked.
pub fn has_country_code_form(text: &str) -> bool {
    text.len() == 2 && text.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_are_in_order_and_of_their_form() {
        assert!(CODES.windows(2).all(|w| w[0] < w[1]));
        assert!(CODES.iter().all(|c| has_country_code_form(c)));
    }

    #[test]
    fn assigned_codes_are_countries_and_others_are_not() {
        for code in [
            "KH", "MY", "TH", "MM", "LA", "VN", "ID", "PH", "XK", "AD", "ZW",
        ] {
            assert!(is_country_code(code), "{code}");
        }
        for code in [
            "CB", "QQ", "ZZ", "XX", "AA", "UK", "kh", "K", "KHM", "", "é",
        ] {
            assert!(!is_country_code(code), "{code}");
        }
        assert!(has_country_code_form("QQ") && !has_country_code_form("kh"));
    }
}
