//! How a state enum is stored: its name in a TEXT column with a CHECK
//! constraint, bound and read through the enum's `as_str` and `FromStr`
//! (also as arrays, for the set-based statements). A leaf module: the typed
//! values of every domain use it, and it uses nothing of the crate.

/// Binds a state enum to the TEXT column that holds its name (`status`,
/// `refund_status`, `outbox.state`), through its `as_str` and `FromStr`.
///
/// TEXT with a CHECK constraint rather than PostgreSQL enum types: SQL
/// producers insert and read these columns as plain text from any language,
/// and a CHECK can be widened in a migration without ALTER TYPE's limits.
/// The SQL guards stay literals (`WHERE status = 'PENDING'`): the partial
/// indexes the claims use only match a literal predicate.
macro_rules! text_state {
    ($t:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $t {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $t {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                text.parse::<$t>().map_err(Into::into)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $t {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $t {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}
pub(crate) use text_state;
