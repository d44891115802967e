-- Transfer ids come from the identity sequence only. With BY DEFAULT, a SQL
-- producer that supplied its own id would leave the sequence behind and make
-- a later enqueue fail on the primary key; ALWAYS rejects such an INSERT at once.
ALTER TABLE transfers ALTER COLUMN id SET GENERATED ALWAYS;
