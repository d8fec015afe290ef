-- orders_denormalized -> third normal form.
--
-- The functional dependencies of the original table:
--   customer_id             -> customer_email, customer_name, customer_city
--   customer_email          -> customer_id            (a second candidate key)
--   product_sku             -> product_name
--   order_id                -> order_date, customer_id
--   (order_id, product_sku) -> quantity, unit_price   (prices change between orders)
--
-- One table per determinant: its primary key is the determinant and its other columns are
-- exactly what that key decides ("the key, the whole key and nothing but the key").
-- Every column keeps its original name so each fact can be traced back.

CREATE TABLE customers (
    customer_id    integer PRIMARY KEY,
    -- A candidate key: two customers never share an email. UNIQUE makes the database say so.
    customer_email text    NOT NULL UNIQUE,
    customer_name  text    NOT NULL,
    customer_city  text    NOT NULL
);

CREATE TABLE products (
    product_sku  text PRIMARY KEY,
    -- Not unique: two SKUs may carry the same name (a cable in two lengths).
    product_name text NOT NULL
);

CREATE TABLE orders (
    order_id    integer PRIMARY KEY,
    order_date  date    NOT NULL,
    customer_id integer NOT NULL REFERENCES customers (customer_id)
);

CREATE TABLE order_lines (
    order_id    integer       NOT NULL REFERENCES orders (order_id),
    product_sku text          NOT NULL REFERENCES products (product_sku),
    quantity    integer       NOT NULL CHECK (quantity > 0),
    -- The price actually charged on this order: it depends on the whole key, not on the SKU.
    unit_price  numeric(10,2) NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (order_id, product_sku)
);

-- The primary key's index serves lookups by order_id (its left prefix); lookups and FK
-- checks by product alone ("who bought this?") need their own index.
CREATE INDEX order_lines_product_sku_idx ON order_lines (product_sku);

-- Move the data, parents before children so every foreign key holds as rows arrive.
-- DISTINCT collapses the repeated copies; if the old table ever disagreed with itself
-- (one customer_id, two names) the primary key would reject the load instead of hiding it.
INSERT INTO customers (customer_id, customer_email, customer_name, customer_city)
SELECT DISTINCT customer_id, customer_email, customer_name, customer_city
FROM orders_denormalized;

INSERT INTO products (product_sku, product_name)
SELECT DISTINCT product_sku, product_name
FROM orders_denormalized;

INSERT INTO orders (order_id, order_date, customer_id)
SELECT DISTINCT order_id, order_date, customer_id
FROM orders_denormalized;

INSERT INTO order_lines (order_id, product_sku, quantity, unit_price)
SELECT order_id, product_sku, quantity, unit_price
FROM orders_denormalized;

-- The original rows, rebuilt from the normalized tables alone. Inner joins lose nothing
-- here: every foreign key is NOT NULL and points at an existing row.
CREATE VIEW orders_rebuilt AS
SELECT o.order_id,
       o.order_date,
       c.customer_id,
       c.customer_email,
       c.customer_name,
       c.customer_city,
       p.product_sku,
       p.product_name,
       l.quantity,
       l.unit_price
FROM order_lines l
JOIN orders    o ON o.order_id    = l.order_id
JOIN customers c ON c.customer_id = o.customer_id
JOIN products  p ON p.product_sku = l.product_sku;

-- Indexes for the other references: "orders of a customer", and the foreign key check
-- when a customer is deleted, read orders by customer_id.
CREATE INDEX orders_customer_id_idx ON orders (customer_id);
